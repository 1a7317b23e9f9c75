package main

import (
	"encoding/base64"
	"encoding/pem"
	"io"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// startTLSELVAServer is a broadcast ELVA server behind TLS with a test CA;
// it returns the server, its wss:// URI and a PEM file with the CA.
func startTLSELVAServer(t *testing.T) (*elvaServer, string, string) {
	t.Helper()
	s := unstartedELVAServer(t, magicSeed)
	s.srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshakes
	s.srv.StartTLS()
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	cert := s.srv.Certificate()
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	return s, s.url(), caFile
}

func TestWSSUpstreamWithPrivateCA(t *testing.T) {
	srv, uri, caFile := startTLSELVAServer(t)
	r := startRelay(t, "--server", uri, "--ca-file", caFile)
	r.logs.waitFor(t, "upstream connected")
	srv.waitConnected(t)
	ws := join(t, r.addr, "doc-a")
	send(t, ws, update1)
	for {
		doc, msg, err := splitIDFrame(magicSeed, srv.nextFrame(t))
		if err == nil && doc == "doc-a" && string(msg) == string(update1) {
			break
		}
	}
}

func TestWSSUpstreamWithoutCAIsRefusedClearly(t *testing.T) {
	_, uri, _ := startTLSELVAServer(t)
	r := startRelay(t, "--server", uri)
	line := r.logs.waitFor(t, "upstream unavailable")
	host := strings.TrimSuffix(strings.TrimPrefix(uri, "wss://"), "/")
	for _, want := range []string{"TLS certificate of " + host + " rejected", "unknown authority", "--ca-file"} {
		if !strings.Contains(line, want) {
			t.Errorf("log line lacks %q: %s", want, line)
		}
	}
}

// TestPasswordNeverLogged runs a relay through Basic auth, a 401, a 403
// with a body, refused reconnects and a reconnect, all at debug level, and
// looks for the password in every form in all it logged.
func TestPasswordNeverLogged(t *testing.T) {
	const user, password = "ada", "pa55-w0rd-secret"
	srv := newELVAServer(t, magicSeed)
	srv.user, srv.password = user, password
	pwFile := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pwFile, []byte(password+"\nignored second line\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	userinfo := strings.Replace(srv.url(), "ws://", "ws://"+user+":"+password+"@", 1)
	for _, args := range [][]string{
		{"--server", srv.url(), "--user", user, "--password-file", pwFile},
		{"--server", userinfo},
	} {
		r := startRelay(t, append(args, "-v", "--retry-max", "500ms")...)
		r.logs.waitFor(t, "upstream connected") // after a 401 and the Basic retry
		ws := join(t, r.addr, "doc")
		send(t, ws, update1)
		srv.refuse.Store(http.StatusForbidden) // "refused by test" in the body
		srv.dropAll()
		r.logs.waitFor(t, "403 Forbidden")
		srv.refuse.Store(http.StatusUnauthorized)
		r.logs.waitFor(t, "refused on reconnect")
		srv.refuse.Store(0)
		r.logs.waitFor(t, "upstream connected")
		r.stop()
		r.waitExit(t)
		logs := r.logs.String()
		basic := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
		for _, secret := range []string{password, basic, "Authorization", user + ":"} {
			if strings.Contains(logs, secret) {
				t.Errorf("the log contains %q:\n%s", secret, logs)
			}
		}
	}
}
