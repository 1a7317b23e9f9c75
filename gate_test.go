package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

func TestGateCheck(t *testing.T) {
	g := gate{host: "localhost", origins: map[string]bool{"https://notes.example.org": true}}
	wide := gate{host: "0.0.0.0", anyIP: true, origins: map[string]bool{}}
	star := gate{host: "localhost", anyOrigin: true}
	tests := []struct {
		name   string
		gate   gate
		target string // request URI as sent
		host   string
		origin string
		status int
		doc    string
		reason string
	}{
		// Origins.
		{"no origin (native client)", g, "/doc", "localhost:8000", "", 0, "doc", ""},
		{"loopback origin", g, "/doc", "localhost:8000", "http://localhost:3000", 0, "doc", ""},
		{"loopback origin https", g, "/doc", "localhost:8000", "https://localhost", 0, "doc", ""},
		{"127.0.0.1 origin", g, "/doc", "localhost:8000", "http://127.0.0.1:5173", 0, "doc", ""},
		{"::1 origin", g, "/doc", "localhost:8000", "http://[::1]:8080", 0, "doc", ""},
		{"127.x origin", g, "/doc", "localhost:8000", "http://127.1.2.3", 0, "doc", ""},
		{"listed origin", g, "/doc", "localhost:8000", "https://notes.example.org", 0, "doc", ""},
		{"other page", g, "/doc", "localhost:8000", "https://evil.example", 403, "", `origin "https://evil.example" not allowed`},
		{"listed origin with other scheme", g, "/doc", "localhost:8000", "http://notes.example.org", 403, "", "not allowed"},
		{"localhost as a subdomain", g, "/doc", "localhost:8000", "http://localhost.evil.example", 403, "", "not allowed"},
		{"null origin (sandboxed page)", g, "/doc", "localhost:8000", "null", 403, "", "not allowed"},
		{"file origin", g, "/doc", "localhost:8000", "file://", 403, "", "not allowed"},
		{"any origin allowed", star, "/doc", "localhost:8000", "https://evil.example", 0, "doc", ""},
		{"upper-case loopback origin", g, "/doc", "localhost:8000", "HTTP://LOCALHOST:3000", 0, "doc", ""},
		{"listed origin, default port", g, "/doc", "localhost:8000", "https://notes.example.org:443", 0, "doc", ""},
		{"listed origin, upper case", g, "/doc", "localhost:8000", "https://Notes.Example.ORG", 0, "doc", ""},
		{"listed origin, other port", g, "/doc", "localhost:8000", "https://notes.example.org:8443", 403, "", "not allowed"},
		{"loopback name with a trailing dot", g, "/doc", "localhost:8000", "http://localhost.", 403, "", "not allowed"},
		{"loopback address inside a name", g, "/doc", "localhost:8000", "http://127.0.0.1.nip.io", 403, "", "not allowed"},
		{"origin with userinfo", g, "/doc", "localhost:8000", "http://evil@localhost", 403, "", "not allowed"},
		{"origin with a path", g, "/doc", "localhost:8000", "http://localhost/x", 403, "", "not allowed"},
		{"0.0.0.0 origin", g, "/doc", "localhost:8000", "http://0.0.0.0:8000", 403, "", "not allowed"},
		// Hosts.
		{"127.0.0.1 host", g, "/doc", "127.0.0.1:8000", "", 0, "doc", ""},
		{"::1 host", g, "/doc", "[::1]:8000", "", 0, "doc", ""},
		{"host without port", g, "/doc", "localhost", "", 0, "doc", ""},
		{"rebinding name", g, "/doc", "attacker.example:8000", "", 403, "", `host "attacker.example:8000" not allowed`},
		{"rebinding name, loopback origin", g, "/doc", "attacker.example:8000", "http://localhost", 403, "", "host"},
		{"LAN address on a loopback relay", g, "/doc", "192.168.1.5:8000", "", 403, "", "host"},
		{"LAN address on a relay bound to all", wide, "/doc", "192.168.1.5:8000", "", 0, "doc", ""},
		{"a name on a relay bound to all", wide, "/doc", "laptop.local:8000", "", 403, "", "host"},
		{"configured host", gate{host: "laptop.local"}, "/doc", "laptop.local:8000", "", 0, "doc", ""},
		{"upper-case host", g, "/doc", "LOCALHOST:8000", "", 0, "doc", ""},
		{"127.x host", g, "/doc", "127.1.2.3:8000", "", 0, "doc", ""},
		{"host with a trailing dot", g, "/doc", "localhost.:8000", "", 403, "", "host"},
		{"loopback address inside a host name", g, "/doc", "127.0.0.1.nip.io:8000", "", 403, "", "host"},
		{"host with userinfo", g, "/doc", "evil@localhost:8000", "", 403, "", "host"},
		{"IPv6 link-local with a zone", g, "/doc", "[fe80::1%25eth0]:8000", "", 403, "", "host"},
		{"0.0.0.0 host on a loopback relay", g, "/doc", "0.0.0.0:8000", "", 403, "", "host"},
		{"empty host", g, "/doc", "", "", 403, "", "host"},
		// Identifiers.
		{"empty", g, "/", "localhost", "", 403, "", "no document name"},
		{"only a query", g, "/?x=1", "localhost", "", 403, "", "no document name"},
		{"percent-decoded", g, "/Gr%C3%BC%C3%9Fe?token=1", "localhost", "", 0, "Grüße", ""},
		{"slash inside", g, "/team/notes", "localhost", "", 0, "team/notes", ""},
		{"250 bytes", g, "/" + strings.Repeat("a", 250), "localhost", "", 0, strings.Repeat("a", 250), ""},
		{"251 bytes", g, "/" + strings.Repeat("a", 251), "localhost", "", 400, "", "251 bytes long, at most 250"},
		{"invalid UTF-8", g, "/a%FFb", "localhost", "", 400, "", "not valid UTF-8"},
		{"NUL", g, "/a%00b", "localhost", "", 400, "", "control character U+0000"},
		{"newline", g, "/a%0Ab", "localhost", "", 400, "", "control character U+000A"},
		{"C1 control", g, "/a%C2%85b", "localhost", "", 400, "", "control character U+0085"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", tt.target, nil)
			r.Host = tt.host
			if tt.origin != "" {
				r.Header.Set("Origin", tt.origin)
			}
			doc, status, kind, reason := tt.gate.check(r)
			if (status == 0) != (kind == noDrop) {
				t.Errorf("status %d with reason kind %q: want a kind exactly with a refusal", status, kind)
			}
			if status != tt.status || doc != tt.doc || !strings.Contains(reason, tt.reason) {
				t.Errorf("got %q, %d, %q; want %q, %d, %q", doc, status, reason, tt.doc, tt.status, tt.reason)
			}
		})
	}
}

// TestGateOverHTTP checks that the gate's answers reach the client before
// any upgrade, with the reason in the body.
func TestGateOverHTTP(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	r := startRelay(t, "--server", srv.url(), "--max-per-document", "1")
	ws := dialLocal(t, r.addr, "full") // takes the document's one place
	send(t, ws, awareness)
	receive(t, ws)
	tests := []struct {
		name   string
		path   string
		host   string
		origin string
		want   int
		body   string
	}{
		{"foreign origin", "/doc", "", "https://evil.example", http.StatusForbidden, "origin"},
		{"rebinding host", "/doc", "attacker.example", "", http.StatusForbidden, "host"},
		{"long name", "/" + strings.Repeat("x", 300), "", "", http.StatusBadRequest, "at most 250"},
		{"control character", "/a%01b", "", "", http.StatusBadRequest, "control character"},
		{"document full", "/full", "", "", http.StatusServiceUnavailable, "too many connections to this document"},
	}
	client := &http.Client{Timeout: testTimeout}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", "http://"+r.addr+tt.path, nil)
			req.Header.Set("Connection", "Upgrade")
			req.Header.Set("Upgrade", "websocket")
			req.Header.Set("Sec-WebSocket-Version", "13")
			req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
			if tt.host != "" {
				req.Host = tt.host
			}
			if tt.origin != "" {
				req.Header.Set("Origin", tt.origin)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			buf := new(strings.Builder)
			_, _ = io.Copy(buf, resp.Body)
			if resp.StatusCode != tt.want || !strings.Contains(buf.String(), tt.body) {
				t.Errorf("got %d %q, want %d with %q", resp.StatusCode, buf.String(), tt.want, tt.body)
			}
		})
	}
	// One rate-limited line per reason: the two bad names share one.
	logs := r.logs.String()
	if n := strings.Count(logs, "request refused"); n != 4 {
		t.Errorf("%d 'request refused' lines, want 4 (one per reason):\n%s", n, logs)
	}
	if !strings.Contains(logs, "origin=https://evil.example") {
		t.Errorf("the log line does not name the origin:\n%s", logs)
	}
}

func TestMaxConnections(t *testing.T) {
	r := startRelay(t, "--server", "ws://127.0.0.1:1/", "--max-connections", "2")
	join(t, r.addr, "a")
	b := join(t, r.addr, "b")
	cfg, _ := websocket.NewConfig("ws://"+r.addr+"/c", "http://localhost/")
	conn, br := rawUpgrade(t, r.addr, "/c")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	conn.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "too many connections") {
		t.Fatalf("a third connection got %d %q, want 503", resp.StatusCode, body)
	}
	// A place frees up when a connection's handler has returned, just
	// after it logs: poll for it, within a bound.
	b.Close()
	r.logs.waitFor(t, "editor disconnected")
	deadline := time.Now().Add(testTimeout)
	for {
		ws, err := websocket.DialConfig(cfg)
		if err == nil {
			ws.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no place after a connection ended: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// rawUpgrade sends an upgrade request for path and returns the connection
// with the answer unread.
func rawUpgrade(t *testing.T, addr, path string) (net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, testTimeout)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(testTimeout))
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", path)
	return conn, bufio.NewReader(conn)
}

func TestRewritePercent(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want string
	}{
		{"lone percent", "GET /100% HTTP/1.1\r\n", "GET /100%25 HTTP/1.1\r\n"},
		{"percent before an escape", "GET /100%%20sure HTTP/1.1\r\n", "GET /100%25%20sure HTTP/1.1\r\n"},
		{"not hex", "GET /a%zz HTTP/1.1\r\n", "GET /a%25zz HTTP/1.1\r\n"},
		{"one hex digit", "GET /a%4 HTTP/1.1\r\n", "GET /a%254 HTTP/1.1\r\n"},
		{"trailing percent before the query", "GET /a%?x=1 HTTP/1.1\r\n", "GET /a%25?x=1 HTTP/1.1\r\n"},
		{"valid escape unchanged", "GET /%41%c3%bc HTTP/1.1\r\n", "GET /%41%c3%bc HTTP/1.1\r\n"},
		{"query left alone", "GET /a?x=%zz HTTP/1.1\r\n", "GET /a?x=%zz HTTP/1.1\r\n"},
		{"bare LF", "GET /%\n", "GET /%25\n"},
		{"no target", "GET\r\n", "GET\r\n"},
		{"only the request line", "GET /a HTTP/1.1\r\nX-A: %\r\n", "GET /a HTTP/1.1\r\nX-A: %\r\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := string(rewritePercent([]byte(tt.in))); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

// TestPercentInDocumentName checks over real HTTP that a document name
// with a '%' that starts no escape, as browsers send it, is decoded as a
// browser would and reaches the upstream under that name.
func TestPercentInDocumentName(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	r := startRelay(t, "--server", srv.url())
	r.logs.waitFor(t, "upstream connected")
	tests := []struct {
		name   string
		target string
		doc    string
	}{
		{"y-websocket room '100% sure'", "100%%20sure", "100% sure"},
		{"not hex", "a%zz", "a%zz"},
		{"trailing percent", "50%", "50%"},
		{"valid escape", "Gr%C3%BC%C3%9Fe", "Grüße"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn, _ := rawJoin(t, r.addr, tt.target)
			msg := unhex(t, "00 00 01 00")
			conn.Write(maskedFrame(0x82, msg))
			want := append(appendIDPrefix(nil, magicSeed, tt.doc), msg...)
			if got := srv.nextFrame(t); !bytes.Equal(got, want) {
				t.Errorf("upstream got % x, want % x", got, want)
			}
		})
	}
}

// TestRefusalsLoggedPerReason checks that the log throttle is per reason:
// a refused origin is named even right after a refusal of another kind.
func TestRefusalsLoggedPerReason(t *testing.T) {
	r := startRelay(t, "--server", "ws://127.0.0.1:1/")
	tests := []struct {
		name   string
		host   string
		origin string
		want   []string // in the log line
	}{
		{"rebinding host", "attacker.example", "", []string{"reason=host", `detail="host \"attacker.example\" not allowed`}},
		{"foreign origin", "", "https://evil.example", []string{"reason=origin", "origin=https://evil.example"}},
		{"plain request", "", "", []string{`reason="not an upgrade"`}},
	}
	client := &http.Client{Timeout: testTimeout}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", "http://"+r.addr+"/doc", nil)
			if tt.host != "" {
				req.Host = tt.host
			}
			if tt.origin != "" {
				req.Header.Set("Origin", tt.origin)
				req.Header.Set("Connection", "Upgrade")
				req.Header.Set("Upgrade", "websocket")
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			line := r.logs.waitFor(t, "request refused")
			for _, want := range tt.want {
				if !strings.Contains(line, want) {
					t.Errorf("got %q, want %q in it", line, want)
				}
			}
		})
	}
}
