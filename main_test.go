package main

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

func TestRelayPrefixesFramesUpstream(t *testing.T) {
	for _, magic := range []idMagic{magicSeed, magicASCII} {
		t.Run(magic.String(), func(t *testing.T) {
			srv := newELVAServer(t, magic)
			r := startRelay(t, "--server", srv.url(), "--id-magic", magic.String())
			r.logs.waitFor(t, "upstream connected")
			ws := dialLocal(t, r.addr, "doc-a")
			send(t, ws, unhex(t, "00 02 03 01 02 03"))
			want := append([]byte{magic[0], magic[1]}, unhex(t, "05 64 6f 63 2d 61 00 02 03 01 02 03")...)
			if got := srv.nextFrame(t); !bytes.Equal(got, want) {
				t.Errorf("upstream got % x, want % x", got, want)
			}
		})
	}
}

func TestRelayDecodesPathAndDropsQuery(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	r := startRelay(t, "--server", srv.url())
	r.logs.waitFor(t, "upstream connected")
	ws := dialLocal(t, r.addr, "Gr%C3%BC%C3%9Fe?token=abc")
	send(t, ws, unhex(t, "00 00 01 00"))
	want := unhex(t, "02 00 07 47 72 c3 bc c3 9f 65 00 00 01 00")
	if got := srv.nextFrame(t); !bytes.Equal(got, want) {
		t.Errorf("upstream got % x, want % x", got, want)
	}
}

func TestUpstreamFrameReachesLocalEditors(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	r := startRelay(t, "--server", srv.url())
	r.logs.waitFor(t, "upstream connected")
	srv.waitConnected(t) // the server can send to the relay
	a := join(t, r.addr, "doc-a")
	b := join(t, r.addr, "doc-a")
	other := join(t, r.addr, "doc-b")
	update := unhex(t, "00 02 03 01 02 03")
	srv.sendAll(append(appendIDPrefix(nil, magicSeed, "doc-a"), update...))
	marker := unhex(t, "00 02 01 07")
	srv.sendAll(append(appendIDPrefix(nil, magicSeed, "doc-b"), marker...))
	for _, ws := range []*websocket.Conn{a, b} {
		receiveSkipping(t, ws, func(msg []byte) bool { return bytes.Equal(msg, update) })
	}
	// doc-b hears only its own document's message, and fails on doc-a's.
	receiveSkipping(t, other, func(msg []byte) bool { return bytes.Equal(msg, marker) })
}

func TestLocalHTTPAnswers(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	r := startRelay(t, "--server", srv.url())
	upgrade := http.Header{
		"Connection":            {"Upgrade"},
		"Upgrade":               {"websocket"},
		"Sec-Websocket-Version": {"13"},
		"Sec-Websocket-Key":     {"dGhlIHNhbXBsZSBub25jZQ=="},
	}
	tests := []struct {
		name   string
		path   string
		header http.Header
		want   int
		body   string
	}{
		{"upgrade without document", "/", upgrade, http.StatusForbidden, "no document name"},
		{"upgrade with only a query", "/?x=1", upgrade, http.StatusForbidden, "no document name"},
		{"plain request for a document", "/doc-a", nil, http.StatusUpgradeRequired, "Yjs WebSocket relay"},
		{"status as JSON", "/", nil, http.StatusOK, `"version":`},
		{"status for a browser", "/", http.Header{"Accept": {"text/html,application/xhtml+xml,*/*;q=0.8"}}, http.StatusOK, "<!doctype html>"},
		{"status from a foreign page", "/", http.Header{"Origin": {"https://evil.example"}}, http.StatusForbidden, "not allowed"},
		{"metrics", "/metrics", nil, http.StatusOK, "# TYPE elva_editors gauge"},
		{"metrics for a rebinding host", "/metrics", http.Header{"Host": {"attacker.example"}}, http.StatusForbidden, "not allowed"},
	}
	client := &http.Client{Timeout: testTimeout}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", "http://"+r.addr+tt.path, nil)
			for k, v := range tt.header {
				req.Header[k] = v
			}
			if host := tt.header.Get("Host"); host != "" {
				req.Host = host
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.want || !strings.Contains(string(body), tt.body) {
				t.Errorf("got %d %q, want %d with %q", resp.StatusCode, body, tt.want, tt.body)
			}
		})
	}
}

// TestStatusAndMetricsAfterASession scripts a session (two documents,
// three editors, one upstream reconnect, one refused origin) and checks
// the figures of the status JSON and of the metrics, whose text must
// follow the exposition format line by line.
func TestStatusAndMetricsAfterASession(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	r := startRelay(t, "--server", srv.url(), "--data-dir", t.TempDir())
	srv.waitConnected(t)
	r.logs.waitFor(t, "upstream connected")
	docB := `notes "b" \ 2` // quotes and a backslash, escaped in the metrics
	a1, a2 := join(t, r.addr, "doc-a"), join(t, r.addr, "doc-a")
	join(t, r.addr, url.PathEscape(docB))
	update := updateMsg(unhex(t, "01 01 c8 01 00 04 01 01 74 01 61 00")) // client 200 inserts "a" into text "t"
	send(t, a1, update)
	receiveSkipping(t, a2, func(msg []byte) bool { return bytes.Equal(msg, update) })

	srv.dropAll()
	srv.waitConnected(t)
	r.logs.waitFor(t, "upstream connected")
	req, _ := http.NewRequest("GET", "http://"+r.addr+"/", nil)
	req.Header.Set("Origin", "https://evil.example")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusForbidden {
		t.Fatalf("foreign origin: %v %v, want 403", resp, err)
	} else {
		resp.Body.Close()
	}

	var st statusReport
	if err := json.Unmarshal(httpGet(t, "http://"+r.addr+"/", "application/json"), &st); err != nil {
		t.Fatalf("status JSON: %v", err)
	}
	checks := []struct {
		what      string
		got, want any
	}{
		{"editors", st.Editors, 3},
		{"documents", len(st.Documents), 2},
		{"editor joins", st.Joins, int64(3)},
		{"refused origins", st.Refusals["origin"], int64(1)},
		{"upstream state", st.Upstream.State, "connected"},
		{"upstream protocol", st.Upstream.Protocol, protocolELVA},
		{"upstream connections", st.Upstream.Connections, int64(1)},
		{"upstream reconnects", st.Upstream.Reconnects, int64(1)},
		{"store on", st.Store.Enabled, true},
		{"editors' messages in", st.Traffic["editors"].MsgsIn, uint64(4)}, // three hellos and the update
	}
	if len(st.Documents) == 2 {
		a, b := st.Documents[0], st.Documents[1]
		checks = append(checks, []struct {
			what      string
			got, want any
		}{
			{"first document", a.Name, "doc-a"},
			{"doc-a editors", a.Editors, 2},
			{"doc-a messages in", a.MsgsIn, uint64(3)},
			{"doc-a bytes in", a.BytesIn, uint64(6 + len(update))},
			{"second document", b.Name, docB},
			{"doc-b editors", b.Editors, 1},
			{"doc-b messages in", b.MsgsIn, uint64(1)},
		}...)
		if a.MsgsOut < 3 { // the update to a2; both hellos echoed to a1 and a2 at least
			t.Errorf("doc-a messages out: %d, want at least 3", a.MsgsOut)
		}
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("status %s: %v, want %v", c.what, c.got, c.want)
		}
	}
	if st.Upstream.ConnectedSince == nil || st.Upstream.LastCloseCode == 0 {
		t.Errorf("upstream: connected since %v, last close code %d; want both set after the reconnect", st.Upstream.ConnectedSince, st.Upstream.LastCloseCode)
	}

	samples := parseExposition(t, httpGet(t, "http://"+r.addr+"/metrics", ""))
	for series, want := range map[string]float64{
		`elva_editors`:                                            3,
		`elva_documents_open`:                                     2,
		`elva_document_editors{document="doc-a"}`:                 2,
		`elva_document_editors{document="notes \"b\" \\ 2"}`:      1,
		`elva_document_messages_received_total{document="doc-a"}`: 3,
		`elva_messages_received_total{from="editors"}`:            4,
		`elva_refusals_total{reason="origin"}`:                    1,
		`elva_refusals_total{reason="host"}`:                      0,
		`elva_upstream_connections`:                               1,
		`elva_upstream_reconnects_total`:                          1,
		`elva_editor_joins_total`:                                 3,
		`elva_editor_closes_total{reason="slow"}`:                 0,
		`elva_drops_total{reason="malformed"}`:                    0,
	} {
		got, ok := samples[series]
		if !ok || got != want {
			t.Errorf("metrics %s = %v (present %v), want %v", series, got, ok, want)
		}
	}
}

// httpGet GETs url with the Accept header accept (none if empty) and
// returns the body of a 200 answer; anything else fails the test.
func httpGet(t *testing.T, url, accept string) []byte {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err := (&http.Client{Timeout: testTimeout}).Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %q %v", url, resp.StatusCode, body, err)
	}
	return body
}

// parseExposition checks text line by line against the Prometheus text
// format (version 0.0.4): HELP and TYPE lines name a metric once each,
// before its samples; a sample is a metric name, optional labels with
// quoted values (escapes \\, \" and \n only) and a float; no series
// twice; counters end in _total. It returns the samples by series, as
// written.
func parseExposition(t *testing.T, text []byte) map[string]float64 {
	t.Helper()
	name := `[a-zA-Z_:][a-zA-Z0-9_:]*`
	help := regexp.MustCompile(`^# HELP (` + name + `) (?:[^\\\n]|\\[\\n])*$`)
	typ := regexp.MustCompile(`^# TYPE (` + name + `) (counter|gauge|histogram|summary|untyped)$`)
	sample := regexp.MustCompile(`^(` + name + `)((?:\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*")*\})?) (\S+)$`)
	types, helps := map[string]string{}, map[string]bool{}
	samples := map[string]float64{}
	if !bytes.HasSuffix(text, []byte("\n")) {
		t.Errorf("metrics do not end with a line feed")
	}
	for i, line := range strings.Split(strings.TrimSuffix(string(text), "\n"), "\n") {
		switch m := []string(nil); {
		case strings.HasPrefix(line, "# HELP "):
			if m = help.FindStringSubmatch(line); m == nil || helps[m[1]] {
				t.Errorf("line %d: bad or second HELP: %q", i+1, line)
			} else {
				helps[m[1]] = true
			}
		case strings.HasPrefix(line, "# TYPE "):
			if m = typ.FindStringSubmatch(line); m == nil || types[m[1]] != "" {
				t.Errorf("line %d: bad or second TYPE: %q", i+1, line)
			} else if types[m[1]] = m[2]; m[2] == "counter" && !strings.HasSuffix(m[1], "_total") {
				t.Errorf("line %d: counter %s does not end in _total", i+1, m[1])
			}
		default:
			m = sample.FindStringSubmatch(line)
			if m == nil {
				t.Errorf("line %d: not a sample: %q", i+1, line)
				continue
			}
			v, err := strconv.ParseFloat(m[3], 64)
			if err != nil || types[m[1]] == "" {
				t.Errorf("line %d: value %q (%v) or no TYPE before it: %q", i+1, m[3], err, line)
			}
			if _, dup := samples[m[1]+m[2]]; dup {
				t.Errorf("line %d: series twice: %q", i+1, line)
			}
			samples[m[1]+m[2]] = v
		}
	}
	return samples
}

func TestUpstreamAuthRetriesWithBasic(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	srv.user, srv.password = "ada", "s3cret-pw"
	r := startRelay(t, "--server", srv.url(), "--user", "ada", "--password", "s3cret-pw")
	r.logs.waitFor(t, "upstream connected")
	first, second := <-srv.authHeaders, <-srv.authHeaders
	if first != "" {
		t.Errorf("first handshake carried credentials %q; want none", first)
	}
	if want := "Basic YWRhOnMzY3JldC1wdw=="; second != want {
		t.Errorf("second handshake: Authorization %q, want %q", second, want)
	}
	ws := dialLocal(t, r.addr, "doc-a")
	send(t, ws, unhex(t, "00 00 01 00"))
	if got := srv.nextFrame(t); !bytes.HasPrefix(got, unhex(t, "02 00 05")) {
		t.Errorf("upstream got % x after auth", got)
	}
	if strings.Contains(r.logs.String(), "s3cret-pw") || strings.Contains(r.logs.String(), "YWRhOnMzY3JldC1wdw") {
		t.Errorf("the password is in the log:\n%s", r.logs)
	}
}

func TestUpstreamAuthRefusedOnReconnectIsRetried(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	srv.user, srv.password = "ada", "pw"
	r := startRelay(t, "--server", srv.url(), "--user", "ada", "--password", "pw")
	r.logs.waitFor(t, "upstream connected")
	srv.waitConnected(t) // so that dropAll finds the connection
	// The server restarts and refuses everyone for a while.
	srv.refuse.Store(http.StatusUnauthorized)
	srv.dropAll()
	r.logs.waitFor(t, "refused on reconnect, retrying")
	srv.refuse.Store(0)
	r.logs.waitFor(t, "upstream connected")
	select {
	case code := <-r.status:
		t.Fatalf("relay exited with %d", code)
	default:
	}
}

func TestUpstreamAuthFailureExits(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"wrong password", []string{"--user", "ada", "--password", "wrong-pw"}, `for user \"ada\": server answered HTTP 401 Unauthorized: \"invalid credentials\"`},
		{"no user configured", nil, "no user is set"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newELVAServer(t, magicSeed)
			srv.user, srv.password = "ada", "right-pw"
			r := startRelay(t, append([]string{"--server", srv.url()}, tt.args...)...)
			if code := r.waitExit(t); code != 1 {
				t.Errorf("exit status %d, want 1", code)
			}
			logs := r.logs.String()
			if !strings.Contains(logs, tt.want) {
				t.Errorf("log lacks %q:\n%s", tt.want, logs)
			}
			if strings.Contains(logs, "wrong-pw") {
				t.Errorf("the password is in the log:\n%s", logs)
			}
		})
	}
}

func TestUpstreamRefusalIsRetried(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	srv.refuse.Store(http.StatusServiceUnavailable)
	r := startRelay(t, "--server", srv.url())
	// Let the relay fail twice, then accept.
	<-srv.authHeaders
	<-srv.authHeaders
	srv.refuse.Store(0)
	r.logs.waitFor(t, "upstream connected")
	logs := r.logs.String()
	if !strings.Contains(logs, `server answered HTTP 503 Service Unavailable: \"refused by test\"`) {
		t.Errorf("log does not name the status and body:\n%s", logs)
	}
	if n := strings.Count(logs, "upstream unavailable"); n != 1 {
		t.Errorf("%d 'upstream unavailable' lines, want 1 per outage", n)
	}
}

func TestUpstreamDownLocalKeepsServing(t *testing.T) {
	// A port with nothing behind it: connections are refused.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "ws://" + ln.Addr().String() + "/"
	ln.Close()
	r := startRelay(t, "--server", dead)
	a := join(t, r.addr, "doc-a")
	b := join(t, r.addr, "doc-a")
	update := unhex(t, "00 02 01 09")
	send(t, a, update)
	receiveSkipping(t, b, func(m []byte) bool { return bytes.Equal(m, update) })
}

// init keeps every test from reading an elva.toml that lies above the
// checkout: parseArgs (and run) search no directory in the tests; those of
// the search give parseArgsIn a directory of their own.
func init() { workDir = func() string { return "" } }

func TestParseArgs(t *testing.T) {
	env := map[string]string{}
	getenv := func(k string) string {
		if v, ok := env[k]; ok || k != "HOME" {
			return v
		}
		return "/home/ada" // a data directory by default, as on a laptop
	}
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		want    func(*config) bool
		wantErr string
	}{
		{"defaults", []string{"--server", "ws://example.org"}, nil, func(c *config) bool {
			return c.host == "localhost" && c.port == 8000 && c.server.String() == "ws://example.org/" && c.magic == magicSeed && c.maxMessage == 32<<20
		}, ""},
		{"positional before flags", []string{"0.0.0.0", "9000", "--server", "ws://e/"}, nil, func(c *config) bool { return c.host == "0.0.0.0" && c.port == 9000 }, ""},
		{"flags between positionals", []string{"h", "--server", "ws://e/", "9001", "-v"}, nil, func(c *config) bool { return c.host == "h" && c.port == 9001 && c.level == slog.LevelDebug }, ""},
		{"double dash", []string{"--server", "ws://e/", "--", "h", "1"}, nil, func(c *config) bool { return c.host == "h" && c.port == 1 }, ""},
		{"environment", nil, map[string]string{"ELVA_SERVER": "wss://e/", "ELVA_USER": "u", "ELVA_PASSWORD": "p"}, func(c *config) bool {
			return c.server.Scheme == "wss" && c.user == "u" && c.password == "p"
		}, ""},
		{"flags override environment", []string{"--user", "flag"}, map[string]string{"ELVA_SERVER": "wss://e/", "ELVA_USER": "env"}, func(c *config) bool { return c.user == "flag" }, ""},
		{"userinfo moved out of the URI", []string{"--server", "wss://ada:pw@e:81/x"}, nil, func(c *config) bool {
			return c.user == "ada" && c.password == "pw" && c.server.String() == "wss://e:81/x"
		}, ""},
		{"credentials over ws:// to another host", []string{"--server", "ws://e/", "--user", "u"}, nil, nil, "refusing to send credentials in clear text to e"},
		{"credentials over ws:// allowed explicitly", []string{"--server", "ws://e/", "--user", "u", "--allow-insecure-auth"}, nil, func(c *config) bool { return c.user == "u" }, ""},
		{"credentials over ws:// to loopback", []string{"--server", "ws://127.0.0.1:9/", "--user", "u"}, nil, func(c *config) bool { return c.user == "u" }, ""},
		{"password flag warned about", []string{"--server", "wss://e/", "--password", "p"}, nil, func(c *config) bool {
			return len(c.warnings) == 1 && strings.Contains(c.warnings[0], "process list")
		}, ""},
		{"allow origin", []string{"--server", "wss://e/", "--allow-origin", "https://notes.example.org", "--allow-origin", "http://a:8080/"}, nil, func(c *config) bool {
			return c.gate.origins["https://notes.example.org"] && c.gate.origins["http://a:8080"] && !c.gate.anyOrigin
		}, ""},
		{"allow any origin warned about", []string{"--server", "wss://e/", "--allow-origin", "*"}, nil, func(c *config) bool {
			return c.gate.anyOrigin && len(c.warnings) == 1
		}, ""},
		{"bad origin", []string{"--server", "wss://e/", "--allow-origin", "notes.example.org"}, nil, nil, "want scheme://host"},
		{"origin normalised", []string{"--server", "wss://e/", "--allow-origin", "HTTPS://Notes.Example.org:443/"}, nil, func(c *config) bool {
			return c.gate.origins["https://notes.example.org"]
		}, ""},
		{"server URI given as HOST", []string{"ws://ada:topsecret@e/"}, map[string]string{"ELVA_SERVER": "wss://e/"}, nil, "use --server"},
		{"non-loopback bind warned about", []string{"--server", "wss://e/", "0.0.0.0"}, nil, func(c *config) bool {
			return c.gate.anyIP && len(c.warnings) == 1 && strings.Contains(c.warnings[0], "over the network")
		}, ""},
		{"limits", []string{"--server", "wss://e/", "--max-connections", "5", "--max-per-document", "2"}, nil, func(c *config) bool {
			return c.limits == limits{conns: 5, perDoc: 2}
		}, ""},
		{"zero limit", []string{"--server", "wss://e/", "--max-connections", "0"}, nil, nil, "at least 1"},
		{"missing CA file", []string{"--server", "wss://e/", "--ca-file", "/nonexistent.pem"}, nil, nil, "--ca-file"},
		{"id magic 4944", []string{"--server", "ws://e/", "--id-magic", "4944"}, nil, func(c *config) bool { return c.magic == magicASCII }, ""},
		{"max message", []string{"--server", "ws://e/", "--max-message", "512KiB"}, nil, func(c *config) bool { return c.maxMessage == 512<<10 }, ""},
		{"no server: standalone with a store", nil, nil, func(c *config) bool {
			return c.server == nil && !c.noStore && c.dataDir == filepath.Join(homeDataDir("/home/ada"), "elva-service") && len(c.warnings) == 0
		}, ""},
		{"data dir flag", []string{"--data-dir", "/srv/docs"}, nil, func(c *config) bool { return c.dataDir == "/srv/docs" }, ""},
		{"data dir environment", nil, map[string]string{"ELVA_DATA_DIR": "/srv/e"}, func(c *config) bool { return c.dataDir == "/srv/e" }, ""},
		{"data dir flag beats environment", []string{"--data-dir", "/srv/f"}, map[string]string{"ELVA_DATA_DIR": "/srv/e"}, func(c *config) bool { return c.dataDir == "/srv/f" }, ""},
		{"no store", []string{"--no-store"}, nil, func(c *config) bool { return c.noStore && c.dataDir == "" }, ""},
		{"no home: runs without a store, warned", nil, map[string]string{"HOME": ""}, func(c *config) bool {
			return c.noStore && len(c.warnings) == 1 && strings.Contains(c.warnings[0], "--data-dir")
		}, ""},
		{"no home: the tools need a directory", []string{"--list-docs"}, map[string]string{"HOME": ""}, nil, "--data-dir"},
		{"fsync interval", []string{"--fsync-interval", "1s"}, nil, func(c *config) bool { return c.fsyncInterval == time.Second }, ""},
		{"fsync interval zero", []string{"--fsync-interval", "0"}, nil, func(c *config) bool { return c.fsyncInterval == 0 }, ""},
		{"negative fsync interval", []string{"--fsync-interval", "-1s"}, nil, nil, "--fsync-interval"},
		{"tools need a store", []string{"--no-store", "--list-docs"}, nil, nil, "no store"},
		{"bad scheme", []string{"--server", "http://e/"}, nil, nil, "scheme must be ws or wss"},
		{"no host", []string{"--server", "ws:///x"}, nil, nil, "no host"},
		{"bad server port", []string{"--server", "ws://e:99999/"}, nil, nil, "bad port"},
		{"bad port", []string{"--server", "ws://e/", "h", "80x"}, nil, nil, `port "80x"`},
		{"port out of range", []string{"--server", "ws://e/", "h", "70000"}, nil, nil, "0 to 65535"},
		{"too many arguments", []string{"--server", "ws://e/", "h", "1", "x"}, nil, nil, "too many arguments"},
		{"unknown flag", []string{"--nope"}, nil, nil, "flag provided but not defined"},
		{"bad id magic", []string{"--server", "ws://e/", "--id-magic", "0201"}, nil, nil, "want 0200 or 4944"},
		{"bad size", []string{"--server", "ws://e/", "--max-message", "lots"}, nil, nil, "--max-message"},
		{"size under 1KiB", []string{"--server", "ws://e/", "--max-message", "10"}, nil, nil, "a bare number is bytes"},
		{"server without a scheme", []string{"--server", "127.0.0.1:8765"}, nil, nil, "want ws://HOST:PORT/"},
		{"another mode's flag warns", []string{"--server", "ws://e/", "--protocol", "yjs", "--id-magic", "4944"}, nil, func(c *config) bool {
			return len(c.warnings) == 1 && strings.Contains(c.warnings[0], "--id-magic is for --protocol elva")
		}, ""},
		{"server is the relay itself", []string{"--server", "ws://localhost:8000/"}, nil, nil, "identical to the service address"},
		{"server is the relay by loopback address", []string{"--server", "ws://127.0.0.1:9000/", "localhost", "9000"}, nil, nil, "identical"},
		{"IPv6 host", []string{"--server", "wss://e/", "::1", "9000"}, nil, func(c *config) bool { return c.host == "::1" && c.port == 9000 }, ""},
		{"bracketed IPv6 host", []string{"--server", "wss://e/", "[::1]", "9000"}, nil, func(c *config) bool { return c.host == "::1" }, ""},
		{"IPv4 host", []string{"--server", "wss://e/", "127.0.0.1", "9000"}, nil, func(c *config) bool { return c.host == "127.0.0.1" }, ""},
		{"upper-case localhost", []string{"--server", "wss://e/", "LOCALHOST", "9000"}, nil, func(c *config) bool { return c.host == "LOCALHOST" }, ""},
		{"host name", []string{"--server", "wss://e/", "notes-1.example.org", "9000"}, nil, func(c *config) bool { return c.host == "notes-1.example.org" }, ""},
		{"credentials as HOST", []string{"--server", "ws://ada:secret@127.0.0.1:9/", "ada:secret@127.0.0.1", "40445"}, nil, nil, "looks like credentials or a URI"},
		{"host with a port", []string{"--server", "wss://e/", "localhost:9000"}, nil, nil, "give HOST and PORT as two arguments"},
		{"label ends with a dash", []string{"--server", "wss://e/", "x-.example", "1"}, nil, nil, "not a host name"},
		{"underscore", []string{"--server", "wss://e/", "a_b", "1"}, nil, nil, "not a host name"},
		{"empty label", []string{"--server", "wss://e/", "a..b", "1"}, nil, nil, "not a host name"},
		{"label of 64 bytes", []string{"--server", "wss://e/", strings.Repeat("a", 64) + ".org", "1"}, nil, nil, "not a host name"},
		{"bracketed IPv4", []string{"--server", "wss://e/", "[127.0.0.1]", "1"}, nil, nil, "not an IPv6 address"},
		{"lone port", []string{"--server", "wss://e/", "9000"}, nil, nil, `"9000" looks like a port: give HOST PORT, e.g. localhost 9000`},
		{"lone zero", []string{"0", "--server", "wss://e/"}, nil, nil, "looks like a port"},
		{"no pings turn the peer timeout off", []string{"--server", "wss://e/", "--ping-interval", "0"}, nil, func(c *config) bool {
			return c.keepalive == keepalive{}
		}, ""},
		{"no pings, explicit peer timeout", []string{"--server", "wss://e/", "--ping-interval", "0", "--peer-timeout", "30s"}, nil, nil, "--peer-timeout 30s needs pings"},
		{"no pings, no peer timeout", []string{"--server", "wss://e/", "--ping-interval", "0", "--peer-timeout", "0"}, nil, func(c *config) bool {
			return c.keepalive == keepalive{}
		}, ""},
		{"a longer ping interval lengthens the default peer timeout", []string{"--server", "wss://e/", "--ping-interval", "30s"}, nil, func(c *config) bool {
			return c.keepalive == keepalive{interval: 30 * time.Second, timeout: 90 * time.Second}
		}, ""},
		{"a longer ping interval with a peer timeout too short", []string{"--server", "wss://e/", "--ping-interval", "30s", "--peer-timeout", "30s"}, nil, nil, "at least twice"},
		{"duration without a unit", []string{"--server", "wss://e/", "--ping-interval", "10"}, nil, nil, `invalid value "10" for flag --ping-interval: use a unit, e.g. 10s`},
		{"integer flag not a number", []string{"--server", "wss://e/", "--max-connections", "many"}, nil, nil, "want a whole number"},
		{"upstream max message default", []string{"--server", "wss://e/"}, nil, func(c *config) bool { return c.upstreamMaxMessage == 1<<20 }, ""},
		{"upstream max message flag", []string{"--server", "wss://e/", "--upstream-max-message", "64KiB"}, nil, func(c *config) bool { return c.upstreamMaxMessage == 64<<10 }, ""},
		{"upstream max message environment", []string{"--server", "wss://e/"}, map[string]string{"ELVA_UPSTREAM_MAX_MESSAGE": "2MiB"}, func(c *config) bool {
			return c.upstreamMaxMessage == 2<<20
		}, ""},
		{"upstream max message flag beats environment", []string{"--server", "wss://e/", "--upstream-max-message", "3M"}, map[string]string{"ELVA_UPSTREAM_MAX_MESSAGE": "2MiB"}, func(c *config) bool {
			return c.upstreamMaxMessage == 3<<20
		}, ""},
		{"bad upstream max message", []string{"--server", "wss://e/", "--upstream-max-message", "big"}, nil, nil, "--upstream-max-message"},
		{"bad upstream max message in the environment", []string{"--server", "wss://e/"}, map[string]string{"ELVA_UPSTREAM_MAX_MESSAGE": "0"}, nil, "--upstream-max-message"},
		{"other port is fine", []string{"--server", "ws://localhost:8001/"}, nil, func(c *config) bool { return c.port == 8000 }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env = tt.env
			cfg, err := parseArgs(tt.args, getenv)
			checkConfig(t, cfg, err, tt.want, tt.wantErr)
		})
	}
}

// checkConfig fails t unless err has wantErr in it or, without wantErr,
// there is no error and want accepts cfg.
func checkConfig(t *testing.T, cfg *config, err error, want func(*config) bool, wantErr string) {
	t.Helper()
	if wantErr != "" {
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Fatalf("got %v, want an error with %q", err, wantErr)
		}
		return
	}
	if err != nil {
		t.Fatalf("unexpected error: %v", err)
	}
	if !want(cfg) {
		t.Errorf("unexpected config %+v (server %v)", cfg, cfg.server)
	}
}

func TestRunExitStatus(t *testing.T) {
	tests := []struct {
		name   string
		args   []string
		status int
		stdout string
		stderr string
	}{
		{"help", []string{"--help"}, 0, "Usage:", ""},
		{"short help", []string{"-h"}, 0, "Examples:", ""},
		{"version", []string{"--version"}, 0, "elva-service", ""},
		{"bad flag", []string{"--bogus"}, 2, "", "elva-service: flag provided but not defined: --bogus (see --help)\n"},
		{"malformed URI", []string{"--server", "ws://a b/"}, 2, "", "invalid character"},
		{"password not echoed", []string{"--server", "ws://u:topsecret@%zz/"}, 2, "", "elva-service:"},
		{"password in a positional not echoed", []string{"--server", "wss://e/", "h", "ws://u:topsecret@e/"}, 2, "", "port"},
		{"credentials as HOST not echoed", []string{"--server", "ws://ada:topsecret@127.0.0.1:9/", "ada:topsecret@127.0.0.1", "40445"}, 2, "", "use --server"},
		{"credentials as lone HOST not echoed", []string{"--server", "ws://127.0.0.1:9/", "ada:topsecret@localhost"}, 2, "", "credentials"},
		{"duration without a unit", []string{"--server", "wss://e/", "--retry-max", "10"}, 2, "", "use a unit, e.g. 10s (see --help)\n"},
		{"password in extra arguments not echoed", []string{"--server", "wss://e/", "h", "1", "ws://u:topsecret@e/"}, 2, "", "too many"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			status := run(context.Background(), tt.args, &stdout, &stderr, func(string) string { return "" })
			if status != tt.status || !strings.Contains(stdout.String(), tt.stdout) || !strings.Contains(stderr.String(), tt.stderr) {
				t.Errorf("got %d, stdout %q, stderr %q; want %d, %q, %q", status, stdout.String(), stderr.String(), tt.status, tt.stdout, tt.stderr)
			}
			if strings.Count(stderr.String(), "\n") > 1 || strings.Contains(stderr.String(), "topsecret") {
				t.Errorf("stderr should be one line without secrets: %q", stderr.String())
			}
		})
	}
}

// TestRunStopsOnCancel checks the normal stop: status 0, no error.
func TestRunStopsOnCancel(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	r := startRelay(t, "--server", srv.url())
	r.logs.waitFor(t, "upstream connected")
	conn, br := rawJoin(t, r.addr, "doc-a")
	conn.Write(maskedFrame(0x82, awareness))
	r.logs.waitFor(t, "message from editor") // joined
	r.stop()
	if code := r.waitExit(t); code != 0 {
		t.Errorf("exit status %d, want 0", code)
	}
	// The editor is told the relay is going away.
	if code := readCloseCode(t, br); code != closeGoingAway {
		t.Errorf("close code %d, want %d", code, closeGoingAway)
	}
}

func TestGoroutinesReturnToBaseline(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	srv.frames = nil
	r := startRelay(t, "--server", srv.url())
	r.logs.waitFor(t, "upstream connected")
	baseline := runtime.NumGoroutine()

	var polite []*websocket.Conn
	var abrupt []net.Conn
	for i := range 40 {
		doc := fmt.Sprintf("doc-%d", i%4)
		if i%2 == 0 {
			polite = append(polite, join(t, r.addr, doc))
			continue
		}
		conn, _ := rawJoin(t, r.addr, doc)
		conn.Write(maskedFrame(0x82, []byte{msgSync, syncUpdate, 1, byte(i)}))
		abrupt = append(abrupt, conn)
	}
	for _, ws := range polite {
		send(t, ws, []byte{msgSync, syncUpdate, 1, 0})
	}
	// A reader goroutine per editor (writers come and go): well above
	// the baseline, which may itself hold a goroutine or two that were
	// ending (the upstream's handshake), so that the return to it below
	// means something.
	if n := runtime.NumGoroutine(); n < baseline+30 {
		t.Fatalf("%d goroutines with 40 editors, baseline %d", n, baseline)
	}
	for _, ws := range polite {
		ws.Close()
	}
	for _, conn := range abrupt {
		conn.Close() // no close frame
	}
	waitForGoroutines(t, baseline)
}

func TestOpenCloseLoopKeepsResourcesBounded(t *testing.T) {
	r := startRelay(t, "--server", "ws://127.0.0.1:1/", "--max-connections", "16")
	before := heapInUse()
	goroutines := runtime.NumGoroutine()
	for i := range 1000 {
		conn, err := net.Dial("tcp", r.addr)
		if err != nil {
			t.Fatal(err)
		}
		switch i % 3 {
		case 0: // upgrade, then drop
			fmt.Fprintf(conn, "GET /doc-%d HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
				"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", i%7)
		case 1: // half a request, then drop
			fmt.Fprintf(conn, "GET /doc HTTP/1.1\r\nHost: loc")
		}
		conn.Close()
	}
	waitForGoroutines(t, goroutines)
	if after := heapInUse(); after > before+8<<20 {
		t.Errorf("heap grew from %d to %d bytes", before, after)
	}
	// A thousand connections, but the log holds a bounded number of lines.
	if n := strings.Count(r.logs.String(), "editor connected"); n > 2*editorLines {
		t.Errorf("%d 'editor connected' lines for one client in a loop", n)
	}

	// Connections held open before the upgrade are capped too: past
	// --max-connections plus a few, the relay stops accepting.
	var held []net.Conn
	for range 300 {
		conn, err := net.DialTimeout("tcp", r.addr, testTimeout)
		if err != nil {
			break // the kernel's backlog is full: fine
		}
		fmt.Fprintf(conn, "GET /doc HTTP/1.1\r\nHost: loc")
		held = append(held, conn)
	}
	// Each accepted connection costs the server a goroutine or two; 300
	// would be far more than the cap allows.
	if n := runtime.NumGoroutine(); n > goroutines+2*(16+preUpgradeSlots)+10 {
		t.Errorf("%d goroutines with 300 connections held, %d before", n, goroutines)
	}
	for _, conn := range held {
		conn.Close()
	}
	waitForGoroutines(t, goroutines)
	// The relay still serves.
	join(t, r.addr, "doc")
}

func TestLocalhostListensOnBothLoopbacks(t *testing.T) {
	probe, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skip("no IPv6 loopback on this machine")
	}
	probe.Close()
	cfg, err := parseArgs([]string{"--server", "ws://127.0.0.1:1/", "localhost", "0"}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	s, err := listen(cfg, discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int)
	go func() { done <- s.run(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	if len(s.lns) != 2 {
		t.Fatalf("listening on %d addresses, want 127.0.0.1 and ::1", len(s.lns))
	}
	for _, ln := range s.lns {
		ws := join(t, ln.Addr().String(), "doc")
		ws.Close()
	}
}

func TestPasswordFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(path, mode) // past the umask
		return path
	}
	tests := []struct {
		name    string
		path    string
		env     string
		args    []string
		want    string
		wantErr string
	}{
		{"first line", write("ok", "s3cret\nsecond\n", 0o600), "", nil, "s3cret", ""},
		{"no newline", write("short", "s3cret", 0o400), "", nil, "s3cret", ""},
		{"CRLF", write("crlf", "s3cret\r\n", 0o600), "", nil, "s3cret", ""},
		{"wins over ELVA_PASSWORD", write("env", "file-pw\n", 0o600), "env-pw", nil, "file-pw", ""},
		{"--password wins over it", write("flag", "file-pw\n", 0o600), "", []string{"--password", "flag-pw"}, "flag-pw", ""},
		{"readable by the group", write("group", "s3cret\n", 0o640), "", nil, "", "lets others read it"},
		{"readable by all", write("world", "s3cret\n", 0o644), "", nil, "", "chmod 600"},
		{"empty", write("empty", "\nx\n", 0o600), "", nil, "", "first line is empty"},
		{"missing", filepath.Join(dir, "none"), "", nil, "", "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"--server", "wss://e/", "--user", "u", "--password-file", tt.path}, tt.args...)
			cfg, err := parseArgs(args, func(k string) string {
				if k == "ELVA_PASSWORD" {
					return tt.env
				}
				return ""
			})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %v, want an error with %q", err, tt.wantErr)
				}
				if strings.Contains(err.Error(), "s3cret") {
					t.Errorf("the error shows the password: %v", err)
				}
				return
			}
			if err != nil || cfg.password != tt.want {
				t.Fatalf("got %v; want password %q", err, tt.want)
			}
		})
	}
}

func TestSlowHandshakeIsCut(t *testing.T) {
	saved := handshakeTimeout
	handshakeTimeout = 200 * time.Millisecond
	t.Cleanup(func() { handshakeTimeout = saved })
	r := startRelay(t, "--server", "ws://127.0.0.1:1/")
	conn, err := net.Dial("tcp", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /doc HTTP/1.1\r\nHost: localh") // and nothing more
	conn.SetReadDeadline(time.Now().Add(testTimeout))
	if _, err := io.ReadAll(conn); err != nil {
		t.Fatalf("the relay kept a slow handshake open: %v", err)
	}
}

func TestSignalStop(t *testing.T) {
	tests := []struct {
		name   string
		events []signalEvent
		exit   int // -1: no exit, the graceful stop runs
	}{
		{"one signal stops gracefully", []signalEvent{{syscall.SIGTERM, 0}}, -1},
		{"timeout(1): relay, then its group", []signalEvent{{syscall.SIGTERM, 0}, {syscall.SIGTERM, time.Millisecond}}, -1},
		{"just inside the window", []signalEvent{{syscall.SIGTERM, 0}, {syscall.SIGTERM, signalWindow - 1}}, -1},
		{"at the window", []signalEvent{{syscall.SIGTERM, 0}, {syscall.SIGTERM, signalWindow}}, 128 + int(syscall.SIGTERM)},
		{"Ctrl-C again", []signalEvent{{os.Interrupt, 0}, {os.Interrupt, 2 * time.Second}}, 128 + int(syscall.SIGINT)},
		{"duplicate, then deliberate", []signalEvent{{syscall.SIGTERM, 0}, {syscall.SIGTERM, 0}, {syscall.SIGINT, time.Second}}, 128 + int(syscall.SIGINT)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, canceled := runSignalStop(t, tt.events)
			if !canceled {
				t.Error("the first signal did not start the graceful stop")
			}
			if got != tt.exit {
				t.Errorf("got exit %d, want %d (-1: none)", got, tt.exit)
			}
		})
	}
}

// signalEvent is one signal for runSignalStop, at a time after the first.
type signalEvent struct {
	sig os.Signal
	at  time.Duration
}

// runSignalStop feeds events to a signalStop with a fake clock and returns
// the exit status it asked for (-1: none) and whether it started the stop.
func runSignalStop(t *testing.T, events []signalEvent) (exit int, canceled bool) {
	t.Helper()
	base := time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)
	signals, times := make(chan os.Signal), make(chan time.Time)
	exited, stopped, done := make(chan int, 1), make(chan struct{}), make(chan struct{})
	s := &signalStop{
		signals: signals,
		cancel:  sync.OnceFunc(func() { close(stopped) }),
		now:     func() time.Time { return <-times },
		exit:    func(code int) { exited <- code },
		stderr:  io.Discard,
		log:     slog.New(slog.DiscardHandler),
	}
	go func() {
		s.run()
		close(done)
	}()
	deadline := time.After(testTimeout)
	for _, e := range events {
		if !sendOrDone(signals, e.sig, done, deadline) || !sendOrDone(times, base.Add(e.at), done, deadline) {
			break
		}
	}
	close(signals)
	select {
	case <-done:
	case <-deadline:
		t.Fatal("the signal goroutine did not return")
	}
	exit = -1
	select {
	case exit = <-exited:
	default:
	}
	select {
	case <-stopped:
		canceled = true
	default:
	}
	return exit, canceled
}

// sendOrDone sends v on ch; it reports false if done is closed first, and
// panics at the deadline, which only a broken signalStop reaches.
func sendOrDone[T any](ch chan<- T, v T, done <-chan struct{}, deadline <-chan time.Time) bool {
	select {
	case ch <- v:
		return true
	case <-done:
		return false
	case <-deadline:
		panic("signalStop neither took a signal nor returned")
	}
}

// TestDoubleSignalStopsGracefully runs the built binary and delivers the
// stop twice, as timeout(1) and systemd do: it must still stop gracefully
// (the "stopped" line, status 0), not exit with 143 midway. An editor that
// never answers the close frame holds the stop open for closeGrace, so
// that a second signal that is not ignored would cut it short.
func TestDoubleSignalStopsGracefully(t *testing.T) {
	tests := []struct {
		name    string
		wrapper []string // command that runs the relay; the test signals it
		twice   bool     // the test sends the second SIGTERM itself
	}{
		{"two SIGTERMs back to back", nil, true},
		{"under timeout(1)", []string{"timeout", "--preserve-status", "60"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if len(tt.wrapper) > 0 {
				if _, err := exec.LookPath(tt.wrapper[0]); err != nil {
					t.Skipf("%s not installed", tt.wrapper[0])
				}
			}
			srv := newELVAServer(t, magicSeed)
			argv := append(append(tt.wrapper, relayBinary(t)), "--server", srv.url(), "127.0.0.1", "0")
			p := startProcess(t, exec.Command(argv[0], argv[1:]...))
			conn, _ := rawJoin(t, p.addr, "doc")
			conn.Write(maskedFrame(0x82, awareness))
			p.logs.waitFor(t, "editor connected")
			p.cmd.Process.Signal(syscall.SIGTERM) // timeout(1) signals the relay, then its group
			if tt.twice {
				p.logs.waitFor(t, "msg=stopping") // the first signal is in
				p.cmd.Process.Signal(syscall.SIGTERM)
			}
			select {
			case err := <-p.done:
				p.done <- err // for the cleanup
				if err != nil {
					t.Errorf("exit %v, want status 0 after a graceful stop", err)
				}
			case <-time.After(testTimeout):
				t.Fatal("the relay did not stop")
			}
			if !strings.Contains(p.logs.String(), "msg=stopped") {
				t.Errorf("no 'stopped' line: the stop was cut short:\n%s", p.logs.String())
			}
		})
	}
}

// startProcess starts cmd, which runs the relay binary with its log on
// stderr, and waits until the relay listens and its upstream is
// connected. At cleanup the process is stopped with SIGTERM, then its
// process group killed if it is still there.
func startProcess(t *testing.T, cmd *exec.Cmd) *relayProcess {
	t.Helper()
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &relayProcess{cmd: cmd, logs: newLogBuffer(), done: make(chan error, 1)}
	go func() {
		io.Copy(p.logs, stderr)
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		p.stop(t)
		if t.Failed() {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // what a failed stop left
		}
	})
	line := p.logs.waitFor(t, "msg=listening")
	p.addr = listeningRE.FindStringSubmatch(line)[1]
	p.logs.waitFor(t, "upstream connected")
	return p
}

// TestDropsBudgetPerReason checks the drops logger: every event is
// counted; the first of each reason is logged however busy another reason
// is; within warnEvery a reason logs at most its burst, and the next line
// says how many events it stands for.
func TestDropsBudgetPerReason(t *testing.T) {
	var d drops
	start := time.Now()
	tests := []struct {
		name   string
		reason dropReason
		at     time.Duration
		want   int64 // events the line stands for; 0: not logged
	}{
		{"first malformed", dropMalformed, 0, 1},
		{"second malformed, same window", dropMalformed, time.Second, 0},
		{"third malformed, same window", dropMalformed, 2 * time.Second, 0},
		{"first origin refusal despite the others", refusedOrigin, 3 * time.Second, 1},
		{"malformed after the window", dropMalformed, warnEvery, 3},
	}
	for _, tt := range tests {
		n, ok := d.allow(tt.reason, start.Add(tt.at))
		if ok != (tt.want > 0) || n != tt.want {
			t.Errorf("%s: got %d, %v; want %d", tt.name, n, ok, tt.want)
		}
	}
	for range editorLines {
		if _, ok := d.allow(editorJoined, start); !ok {
			t.Fatal("a connect line within the budget was held back")
		}
	}
	if _, ok := d.allow(editorJoined, start); ok {
		t.Error("a connect line past the budget was logged")
	}
	if got := d.total(dropMalformed); got != 4 {
		t.Errorf("malformed counted %d times, want 4", got)
	}
}

// TestStopIsLoggedAsTheRelays checks that an editor closed by the relay's
// stop is logged as closed by the relay, never by the editor, whether or
// not the editor answers the close frame.
func TestStopIsLoggedAsTheRelays(t *testing.T) {
	r := startRelay(t, "--server", "ws://127.0.0.1:1/")
	ws := join(t, r.addr, "doc")
	go io.Copy(io.Discard, ws) // x/net answers the close while reading
	r.stop()
	r.waitExit(t)
	line := r.logs.waitFor(t, "editor disconnected")
	if strings.Contains(line, "closed_by=peer") || !strings.Contains(line, `reason="relay stopping"`) {
		t.Errorf("the stop is logged as the editor's: %s", line)
	}
}

// homeDataDir is where the platform keeps an application's data under
// home: what defaultDataDir gives without XDG_DATA_HOME.
func homeDataDir(home string) string {
	if runtime.GOOS == "darwin" {
		return filepath.Join(home, "Library", "Application Support")
	}
	return filepath.Join(home, ".local", "share")
}

// TestServiceFiles checks the service files in contrib/: the launchd agent
// is well-formed XML with its label and program, and the systemd user unit
// passes `systemd-analyze verify` with ExecStart pointed at the built
// binary (verify checks that the program exists).
func TestServiceFiles(t *testing.T) {
	plist, err := os.ReadFile("contrib/org.elva.service.plist")
	if err != nil {
		t.Fatal(err)
	}
	dec := xml.NewDecoder(bytes.NewReader(plist))
	for {
		if _, err := dec.Token(); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("org.elva.service.plist is not well-formed XML: %v", err)
		}
	}
	for _, want := range []string{"<key>Label</key>", "<string>org.elva.service</string>", "<key>ProgramArguments</key>"} {
		if !bytes.Contains(plist, []byte(want)) {
			t.Errorf("org.elva.service.plist lacks %s", want)
		}
	}

	unit, err := os.ReadFile("contrib/elva-service.service")
	if err != nil {
		t.Fatal(err)
	}
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("systemd-analyze is missing (apt-get install systemd): %v", err)
		}
		t.Skip("systemd-analyze is missing; the unit is not verified")
	}
	const exec0 = "ExecStart=%h/.local/bin/elva-service"
	if !bytes.Contains(unit, []byte(exec0)) {
		t.Fatalf("elva-service.service has no %q line", exec0)
	}
	path := filepath.Join(t.TempDir(), "elva-service.service")
	unit = bytes.Replace(unit, []byte(exec0), []byte("ExecStart="+relayBinary(t)), 1)
	if err := os.WriteFile(path, unit, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, analyze, "verify", path).CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("elva-service.service")) {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// writeConfig writes content to name in dir with mode and returns its path.
func writeConfig(t *testing.T, dir, name, content string, mode os.FileMode) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // past the umask
		t.Fatal(err)
	}
	return path
}

// TestParseTOML checks the TOML subset: what it reads, and that every
// other construct is an error naming the file and its line.
func TestParseTOML(t *testing.T) {
	const good = "\ufeff# a comment\ntop = 'x' # after a value\n\n[app.default]\r\nserver = \"wss://e/\\u00e9\\t\"\n" +
		"port = -8_000\nsecure = true\n[ service ]\nallow-origin = [\n  \"a\", # one\n  'b',\n]\nempty = []\n"
	entries, err := parseTOML("good.toml", good, readAll)
	if err != nil {
		t.Fatalf("parseTOML: %v", err)
	}
	want := []tomlEntry{
		{"", "top", tomlValue{kind: tomlString, str: "x"}, 2},
		{"app.default", "server", tomlValue{kind: tomlString, str: "wss://e/é\t"}, 5},
		{"app.default", "port", tomlValue{kind: tomlInt, num: -8000}, 6},
		{"app.default", "secure", tomlValue{kind: tomlBool, flag: true}, 7},
		{"service", "allow-origin", tomlValue{kind: tomlStrings, list: []string{"a", "b"}}, 9},
		{"service", "empty", tomlValue{kind: tomlStrings, list: []string{}}, 13},
	}
	if fmt.Sprint(entries) != fmt.Sprint(want) {
		t.Errorf("got %v\nwant %v", entries, want)
	}
	tests := []struct {
		name, src, want string
	}{
		{"inline table", "[service]\nx = { a = 1 }", "f.toml:2: unsupported TOML: inline tables"},
		{"array of tables", "\n\n[[servers]]", "f.toml:3: unsupported TOML: arrays of tables"},
		{"multi-line basic string", "x = \"\"\"\nabc\"\"\"", "f.toml:1: unsupported TOML: multi-line strings"},
		{"multi-line literal string", "x = '''abc'''", "f.toml:1: unsupported TOML: multi-line strings"},
		{"float", "# c\nx = 1.5", "f.toml:2: unsupported TOML: floats"},
		{"exponent", "x = 1e6", "f.toml:1: unsupported TOML: floats"},
		{"infinity", "x = -inf", "f.toml:1: unsupported TOML: floats"},
		{"date", "x = 1979-05-27", "f.toml:1: unsupported TOML: dates and times"},
		{"time", "x = 07:32:00", "f.toml:1: unsupported TOML: dates and times"},
		{"hexadecimal", "x = 0xff", "f.toml:1: unsupported TOML: integers in hexadecimal"},
		{"dotted key", "[app]\ndefault.server = 'x'", "f.toml:2: unsupported TOML: dotted keys"},
		{"quoted key", "\"x\" = 1", "f.toml:1: unsupported TOML: quoted keys"},
		{"quoted table name", "[app.\"my app\"]", "f.toml:1: unsupported TOML: quoted table names"},
		{"array of numbers", "x = [\n1, 2]", "f.toml:2: unsupported TOML: arrays of other than strings"},
		{"array of arrays", "x = [['a']]", "f.toml:1: unsupported TOML: arrays of arrays"},
		{"bad escape", "\nx = \"a\\qb\"", `f.toml:2: unsupported TOML: the escape \q`},
		{"escape of a surrogate", `x = "\uD800"`, "f.toml:1: invalid TOML"},
		{"duplicate key", "[s]\nx = 1\n\nx = 2", "f.toml:4: invalid TOML: s.x is defined twice"},
		{"duplicate table", "[s]\n[t]\n[s]", "f.toml:3: invalid TOML: [s] is defined twice"},
		{"key and table of one name", "[app]\ndefault = 1\n[app.default]", "f.toml:3: invalid TOML: [app.default] is defined twice"},
		{"unquoted string", "password = hunter2", "f.toml:1: invalid TOML: a value that is not a string"},
		{"leading zero", "x = 08", "f.toml:1: invalid TOML"},
		{"unclosed string", "x = \"abc\ny = 1", "f.toml:1: invalid TOML: a string without its closing quote"},
		{"unclosed array", "x = ['a',", "f.toml:1: invalid TOML: an array without its closing ]"},
		{"two values", "x = 1 2", "f.toml:1: invalid TOML: unexpected '2' after the value"},
		{"no value", "x =\ny = 1", "f.toml:1: invalid TOML: a key without a value"},
		{"unclosed table", "[app\nx = 1", "f.toml:1: invalid TOML: a table name without its closing ]"},
		{"not UTF-8", "x = \"\xff\"", "f.toml:1: invalid TOML: not UTF-8"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseTOML("f.toml", tt.src, readAll)
			if err == nil || !strings.HasPrefix(err.Error(), tt.want) {
				t.Errorf("got %v, want an error beginning %q", err, tt.want)
			}
			if err != nil && strings.Contains(err.Error(), "hunter2") {
				t.Errorf("the error shows the unquoted value: %v", err)
			}
		})
	}
}

// readAll has parseTOML read every table.
func readAll(string) bool { return true }

// TestParseTOMLPassesOverOtherTables checks that the tables the relay
// does not read may hold any TOML: their values are passed over, and the
// lines of what follows stay right.
func TestParseTOMLPassesOverOtherTables(t *testing.T) {
	const src = `[render]
width = 80.5 # a float
at = 1979-05-27 07:32:00Z
"quoted key".dotted = { a = [1, { b = "]}" }], c = 'x' }
text = """
[service]
port = 1 \"""
"""
lit = '''also ''''' # two quotes before the closing ones
nested = [
  [1, 2], # a comment ]
  ["a", "b"],
]
[[app.editor.plugins]]
name = "x"
[app."my app"]
x = 1
[service]
port = 9000
`
	entries, err := parseTOML("f.toml", src, func(table string) bool { return table == "service" })
	want := []tomlEntry{{"service", "port", tomlValue{kind: tomlInt, num: 9000}, 19}}
	if err != nil || fmt.Sprint(entries) != fmt.Sprint(want) {
		t.Errorf("got %v, %v; want %v", entries, err, want)
	}
	for _, bad := range []string{"[render]\nx = [1, 2", "[render]\nx = \"\"\"abc", "[render]\nx = 1]", "[[service]]"} {
		if _, err := parseTOML("f.toml", bad, func(table string) bool { return table == "service" }); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

// TestConfigFile checks the three layouts, the precedence of flags over
// the environment over the file, and the file's errors, which name the
// file, the line and the key.
func TestConfigFile(t *testing.T) {
	dir := t.TempDir()
	seed := writeConfig(t, dir, "seed.toml", `
[app.default]
server = "wss://seed.example.org/"
user = "ada"
password = "s3cret"
port = 9100
level = 10
[app.service]
server = "wss://service.example.org/"
host = "127.0.0.1"
log = "/tmp/seed.log"
[app.editor]
ansi_color = "yes" # another app's: ignored
`, 0o600)
	elva := writeConfig(t, dir, "elva.toml", `
[connect]
host = "elva.example.org"
port = 8443
path = "sync"
secure = true
identifier = "another app's key: ignored"
[basic]
user = "grace"
secret = "s3cret"
[tls]
cafile = "/nonexistent/ca.pem"
[log]
file = "/tmp/elva.log"
level = "WARNING"
[render]
anything = { goes = "here" }
`, 0o600)
	service := writeConfig(t, dir, "service.toml", `
[app.service]
server = "wss://seed.example.org/"
[service]
server = "ws://127.0.0.1:9999/"
protocol = "yjs"
max-connections = 7
max-message = "64KiB"
upstream-max-message = 65536
allow-origin = ["https://notes.example.org"]
ping-interval = "5s"
no-store = true
quiet = true
log-format = "json"
host = "::1"
port = 9200
`, 0o600)
	// BAD stands for the path of a file bad.toml that holds content,
	// written when its case runs.
	BAD := func(content string) string { return "\x00" + content }
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		want    func(*config) bool
		wantErr string
	}{
		{"seed layout", []string{"--config", seed}, nil, func(c *config) bool {
			return c.server.String() == "wss://service.example.org/" && c.user == "ada" && c.password == "s3cret" &&
				c.host == "127.0.0.1" && c.port == 9100 && c.logFile == "/tmp/seed.log" && c.level == slog.LevelDebug
		}, ""},
		{"ELVA layout", []string{"--config", elva}, nil, nil, "/nonexistent/ca.pem"}, // [tls] cafile is read
		{"ELVA layout without the CA", []string{"--config", elva, "--ca-file", ""}, nil, func(c *config) bool {
			return c.server.String() == "wss://elva.example.org:8443/sync" && c.user == "grace" && c.password == "s3cret" &&
				c.logFile == "/tmp/elva.log" && c.level == slog.LevelWarn
		}, ""},
		{"service layout", []string{"--config", service}, nil, func(c *config) bool {
			return c.server.String() == "ws://127.0.0.1:9999/" && c.protocol == protocolYjs && c.limits.conns == 7 &&
				c.maxMessage == 64<<10 && c.upstreamMaxMessage == 64<<10 && c.gate.origins["https://notes.example.org"] &&
				c.keepalive.interval == 5*time.Second && c.noStore && c.level == slog.LevelWarn && c.logFormat == "json" &&
				c.host == "::1" && c.port == 9200
		}, ""},
		{"environment beats the file", []string{"--config", seed}, map[string]string{"ELVA_SERVER": "wss://env.example.org/", "ELVA_USER": "env", "ELVA_PASSWORD": "envpw"}, func(c *config) bool {
			return c.server.Host == "env.example.org" && c.user == "env" && c.password == "envpw" && c.passwordFrom == "env ELVA_PASSWORD"
		}, ""},
		{"flags beat the environment and the file", []string{"--config", seed, "--server", "wss://flag.example.org/", "--user", "flag", "--quiet", "10.0.0.1", "9300"},
			map[string]string{"ELVA_SERVER": "wss://env.example.org/"}, func(c *config) bool {
				return c.server.Host == "flag.example.org" && c.user == "flag" && c.level == slog.LevelWarn && c.host == "10.0.0.1" && c.port == 9300
			}, ""},
		{"flags replace the file's origins", []string{"--config", service, "--allow-origin", "https://other.example.org"}, nil, func(c *config) bool {
			return len(c.gate.origins) == 1 && c.gate.origins["https://other.example.org"]
		}, ""},
		{"password file flag beats the file's secret", []string{"--config", seed, "--password-file", writeConfig(t, dir, "pw", "filepw\n", 0o600)}, nil, func(c *config) bool {
			return c.password == "filepw"
		}, ""},
		{"the file's password file", []string{"--config", BAD("[service]\npassword-file = " + strconvQuote(writeConfig(t, dir, "pw2", "pw2\n", 0o600)))}, nil, func(c *config) bool {
			return c.password == "pw2"
		}, ""},
		{"the file's token", []string{"--config", BAD("[service]\ntoken = 'tok'\nprotocol = 'hocuspocus'")}, nil, func(c *config) bool {
			return c.token == "tok" && !strings.Contains(fmt.Sprint(c.warnings), "--token")
		}, ""},
		{"-v and --quiet", []string{"-v", "--quiet"}, nil, nil, "-v and --quiet contradict each other"},
		{"--verbose=false", []string{"--verbose=false"}, nil, func(c *config) bool { return c.level == slog.LevelInfo && c.levelFrom == "default" }, ""},
		{"-v=false", []string{"-v=false"}, nil, func(c *config) bool { return c.level == slog.LevelInfo }, ""},
		{"--quiet=false", []string{"--quiet=false"}, nil, func(c *config) bool { return c.level == slog.LevelInfo }, ""},
		{"-v=false leaves the file's level", []string{"-v=false", "--config", BAD("[log]\nlevel = 'ERROR'")}, nil, func(c *config) bool { return c.level == slog.LevelError }, ""},
		{"-v=false and --quiet", []string{"-v=false", "--quiet"}, nil, func(c *config) bool { return c.level == slog.LevelWarn }, ""},
		{"file verbose and quiet", []string{"--config", BAD("[service]\nverbose = true\nquiet = true")}, nil, nil, "bad.toml:3: [service] quiet: verbose = true and quiet = true contradict"},
		{"bad log format", []string{"--log-format", "xml"}, nil, nil, `--log-format "xml": want text or json`},
		{"unknown key in [service]", []string{"--config", BAD("[service]\n\nmax_connections = 3")}, nil, nil, "bad.toml:3: [service] max_connections: no such setting; did you mean max-connections?"},
		{"unknown key without a near one", []string{"--config", BAD("[service]\nfrobnicate = 3")}, nil, nil, "bad.toml:2: [service] frobnicate: no such setting: [service] takes host, port and the flags"},
		{"an action in [service]", []string{"--config", BAD("[service]\nlist-docs = true")}, nil, nil, "--list-docs is a command-line action"},
		{"wrong type", []string{"--config", BAD("[service]\nmax-connections = '3'")}, nil, nil, "bad.toml:2: [service] max-connections: want a whole number"},
		{"bad duration", []string{"--config", BAD("[service]\nretry-max = '10'")}, nil, nil, `bad.toml:2 ([service] retry-max): "10": use a unit`},
		{"bad value checked later", []string{"--config", BAD("[log]\nfile = '/x'\n[service]\nprotocol = 'nope'")}, nil, nil, "(--protocol is set in " + filepath.Join(dir, "bad.toml") + ":4 ([service] protocol))"},
		{"bad level", []string{"--config", BAD("[log]\nlevel = 'LOUD'")}, nil, nil, "bad.toml:2: [log] level: want \"DEBUG\""},
		{"bad host", []string{"--config", BAD("[app.service]\nhost = 'a b'")}, nil, nil, "bad.toml:2 ([app.service] host): host \"a b\" is not a host name"},
		{"port out of range", []string{"--config", BAD("[service]\nport = 70000")}, nil, nil, "bad.toml:2 ([service] port): port 70000: want a number from 0 to 65535"},
		{"[connect] without host", []string{"--config", BAD("[connect]\nsecure = true")}, nil, nil, "bad.toml:2: [connect] secure without host"},
		{"[connect] host as a URI", []string{"--config", BAD("[connect]\nhost = 'wss://e/'")}, nil, nil, "want a host name or address only"},
		{"command with shell syntax", []string{"--config", BAD("[basic]\ncommand = 'pass show elva | head -1'")}, nil, nil, "bad.toml:2: [basic] command: the command needs a shell"},
		{"missing --config file", []string{"--config", filepath.Join(dir, "none.toml")}, nil, nil, "--config: stat"},
		{"--print-config's empty paths", []string{"--config", BAD("[service]\npassword-file = ''\ntoken-file = \"\"\nca-file = ''\nlog = ''")}, nil, func(c *config) bool {
			return c.password == "" && c.token == "" && c.tls == nil && c.logFile == ""
		}, ""},
		{"the file's peer timeout with a longer ping interval", []string{"--config", BAD("[service]\nping-interval = '30s'\npeer-timeout = '70s'")}, nil, func(c *config) bool {
			return c.keepalive == keepalive{interval: 30 * time.Second, timeout: 70 * time.Second}
		}, ""},
		{"the file's peer timeout without pings", []string{"--config", BAD("[service]\nping-interval = '0s'\npeer-timeout = '70s'")}, nil, nil, "needs pings"},
		{"another protocol's setting in a file", []string{"--config", BAD("[service]\nid-magic = '4944'\nprotocol = 'yjs'\nserver = 'ws://e/'")}, nil, func(c *config) bool {
			return strings.Contains(fmt.Sprint(c.warnings), "--id-magic is for --protocol elva")
		}, ""},
		{"a key outside any table", []string{"--config", BAD("port = 9000\n[service]\nmax-connections = 5")}, nil, func(c *config) bool {
			return c.port == 8000 && c.limits.conns == 5 && strings.Contains(fmt.Sprint(c.warnings), "bad.toml:1: port is outside any table and ignored")
		}, ""},
		{"--list-docs and --remove-doc", []string{"--list-docs", "--remove-doc", "x"}, nil, nil, "give one of them"},
		{"--print-config's placeholder for a secret", []string{"--config", BAD("[service]\npassword = \"[redacted]\"")}, nil, nil, `bad.toml:2: [service] password: "[redacted]" is the placeholder`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := slices.Clone(tt.args)
			for i, arg := range args {
				if content, ok := strings.CutPrefix(arg, "\x00"); ok {
					args[i] = writeConfig(t, dir, "bad.toml", content, 0o600)
				}
			}
			cfg, err := parseArgs(args, func(k string) string { return tt.env[k] })
			checkConfig(t, cfg, err, tt.want, tt.wantErr)
		})
	}
}

// strconvQuote quotes s as a TOML basic string (Go's quoting is the same
// for the paths the tests write).
func strconvQuote(s string) string { return fmt.Sprintf("%q", s) }

// TestConfigFileDiscovery checks where the files are looked for without
// --config: the first elva.toml in the directory or a parent, over the
// user's.
func TestConfigFileDiscovery(t *testing.T) {
	root := t.TempDir()
	project := writeConfig(t, root, "project/elva.toml", "", 0o600)
	deeper := filepath.Join(root, "project", "a", "b")
	if err := os.MkdirAll(deeper, 0o700); err != nil {
		t.Fatal(err)
	}
	xdg := filepath.Join(root, "xdg")
	user := writeConfig(t, xdg, "elva/elva.toml", "", 0o600)
	if runtime.GOOS == "darwin" {
		t.Skip("the user's file is under ~/Library there")
	}
	tests := []struct {
		name     string
		explicit string
		dir      string
		env      map[string]string
		want     []string
	}{
		{"in a parent", "", deeper, nil, []string{project}},
		{"none", "", root, nil, nil},
		{"the user's under the project's", "", deeper, map[string]string{"XDG_CONFIG_HOME": xdg}, []string{user, project}},
		{"the user's alone", "", root, map[string]string{"XDG_CONFIG_HOME": xdg}, []string{user}},
		{"home without XDG_CONFIG_HOME", "", root, map[string]string{"HOME": filepath.Dir(xdg), "XDG_CONFIG_HOME": ""}, nil},
		{"--config alone", project, deeper, map[string]string{"XDG_CONFIG_HOME": xdg}, []string{project}},
		{"--config names a directory", filepath.Dir(project), root, nil, []string{project}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := configFiles(tt.explicit, tt.dir, func(k string) string { return tt.env[k] })
			if err != nil || fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("got %v, %v; want %v", got, err, tt.want)
			}
		})
	}
	if got := userConfigFile(func(k string) string { return map[string]string{"HOME": "/home/ada"}[k] }); got != "/home/ada/.config/elva/elva.toml" {
		t.Errorf("user file %q, want /home/ada/.config/elva/elva.toml", got)
	}
	// parseArgsIn searches from the directory it is given, as parseArgs
	// does from the working directory.
	writeConfig(t, root, "project/elva.toml", "[service]\nport = 9123\n", 0o600)
	noEnv := func(string) string { return "" }
	cfg, err := parseArgsIn(nil, noEnv, deeper)
	if err != nil || cfg.port != 9123 || fmt.Sprint(cfg.configFiles) != fmt.Sprint([]string{project}) {
		t.Errorf("parseArgsIn from %s: %v, %+v; want port 9123 from %s", deeper, err, cfg, project)
	}
	if cfg, err := parseArgsIn(nil, noEnv, ""); err != nil || len(cfg.configFiles) != 0 {
		t.Errorf("parseArgsIn without a directory: %v, files %v; want none", err, cfg.configFiles)
	}
}

// TestCredentialLayers checks that the user name and the password come
// from the highest layer that gives them (flags, the environment, the
// files), and that the server URI's userinfo belongs to the layer that
// gave the server, below an explicit user or password of that layer.
func TestCredentialLayers(t *testing.T) {
	dir := t.TempDir()
	ran := filepath.Join(dir, "ran")
	basic := writeConfig(t, dir, "basic.toml", "[basic]\nuser = 'ada'\nsecret = 'file-pw'\n", 0o600)
	command := writeConfig(t, dir, "command.toml", fmt.Sprintf("[basic]\nuser = 'ada'\ncommand = ['sh', '-c', 'touch %s; echo cmd-pw']\n", ran), 0o600)
	serverAndBasic := writeConfig(t, dir, "both.toml", "[service]\nserver = 'wss://bob:uri-pw@e/'\n[basic]\nuser = 'ada'\nsecret = 'file-pw'\n", 0o600)
	serverOnly := writeConfig(t, dir, "server.toml", "[service]\nserver = 'wss://bob:uri-pw@e/'\n", 0o600)
	pwFile := writeConfig(t, dir, "pw", "pwfile-pw\n", 0o600)
	const flagURI, envURI = "userinfo of the server URI, flag --server", "userinfo of the server URI, env ELVA_SERVER"
	tests := []struct {
		name               string
		args               []string
		env                map[string]string
		user, password     string
		userFrom, passFrom string
	}{
		{"--server's userinfo beats the file", []string{"--config", basic, "--server", "wss://bob:uri-pw@e/"}, nil, "bob", "uri-pw", flagURI, flagURI},
		{"ELVA_SERVER's userinfo beats the file", []string{"--config", basic}, map[string]string{"ELVA_SERVER": "wss://bob:uri-pw@e/"}, "bob", "uri-pw", envURI, envURI},
		{"--user beats --server's userinfo", []string{"--config", basic, "--server", "wss://bob:uri-pw@e/", "--user", "carl"}, nil, "carl", "uri-pw", "flag --user", flagURI},
		{"--server's userinfo beats the environment", []string{"--server", "wss://bob:uri-pw@e/"}, map[string]string{"ELVA_USER": "carl", "ELVA_PASSWORD": "env-pw"}, "bob", "uri-pw", flagURI, flagURI},
		{"flags beat ELVA_SERVER's userinfo", []string{"--user", "carl", "--password-file", pwFile}, map[string]string{"ELVA_SERVER": "wss://bob:uri-pw@e/"}, "carl", "pwfile-pw", "flag --user", "flag --password-file " + pwFile},
		{"ELVA_USER beats ELVA_SERVER's userinfo", nil, map[string]string{"ELVA_SERVER": "wss://bob:uri-pw@e/", "ELVA_USER": "carl"}, "carl", "uri-pw", "env ELVA_USER", envURI},
		{"a file's [basic] beats its server's userinfo", []string{"--config", serverAndBasic}, nil, "ada", "file-pw", "file " + serverAndBasic + ":4 ([basic] user)", "file " + serverAndBasic + ":5 ([basic] secret)"},
		{"a file's server's userinfo under the environment's user", []string{"--config", serverOnly}, map[string]string{"ELVA_USER": "carl"}, "carl", "uri-pw", "env ELVA_USER", "userinfo of the server URI, file " + serverOnly + ":2 ([service] server)"},
		{"a user name alone in the URI", []string{"--config", basic, "--server", "wss://bob@e/"}, nil, "bob", "file-pw", flagURI, "file " + basic + ":3 ([basic] secret)"},
		{"no command for a password from above", []string{"--config", command, "--server", "wss://bob:uri-pw@e/"}, nil, "bob", "uri-pw", flagURI, flagURI},
		{"no command under ELVA_PASSWORD", []string{"--config", command, "--server", "wss://e/"}, map[string]string{"ELVA_PASSWORD": "env-pw"}, "ada", "env-pw", "file " + command + ":2 ([basic] user)", "env ELVA_PASSWORD"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := parseArgs(tt.args, func(k string) string { return tt.env[k] })
			if err != nil {
				t.Fatal(err)
			}
			if cfg.user != tt.user || cfg.password != tt.password || cfg.userFrom != tt.userFrom || cfg.passwordFrom != tt.passFrom {
				t.Errorf("got %q from %q, %q from %q;\nwant %q from %q, %q from %q", cfg.user, cfg.userFrom, cfg.password, cfg.passwordFrom, tt.user, tt.userFrom, tt.password, tt.passFrom)
			}
			if cfg.server.User != nil {
				t.Errorf("the server URI keeps its userinfo: %v", cfg.server.Redacted())
			}
			if _, err := os.Stat(ran); err == nil {
				t.Error("the [basic] command ran")
			}
		})
	}
}

// TestConfigRelativePaths checks that a relative path in a configuration
// file starts in the file's directory, not in the working directory.
func TestConfigRelativePaths(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "conf")
	path := writeConfig(t, dir, "elva.toml", `[basic]
user = "ada"
[service]
password-file = "pw"
token-file = "sub/token"
data-dir = "../docs"
ca-file = "/etc/ssl/abs.pem"
[log]
file = "relay.log"
`, 0o600)
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	defineFlags(fs, func(string) string { return "" })
	fc := &fileConfig{settings: make(map[string]fileSetting)}
	if err := fc.read(path, settingKinds(fs), false); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{
		"password": filepath.Join(dir, "pw"),
		"token":    filepath.Join(dir, "sub", "token"),
		"data-dir": filepath.Join(filepath.Dir(dir), "docs"),
		"ca-file":  "/etc/ssl/abs.pem",
		"log":      filepath.Join(dir, "relay.log"),
	} {
		if got := fc.settings[name].values; len(got) != 1 || got[0] != want {
			t.Errorf("%s: got %q, want %q", name, got, want)
		}
	}
	tlsConf := writeConfig(t, dir, "tls.toml", "[tls]\ncafile = 'ca.pem'\n", 0o600)
	writeConfig(t, dir, "ca.pem", "not a certificate\n", 0o600)
	if _, err := parseArgs([]string{"--config", tlsConf, "--server", "wss://e/"}, func(string) string { return "" }); err == nil ||
		!strings.Contains(err.Error(), "--ca-file "+filepath.Join(dir, "ca.pem")+": no PEM certificate") {
		t.Errorf("[tls] cafile = 'ca.pem': got %v, want %s read", err, filepath.Join(dir, "ca.pem"))
	}
	writeConfig(t, dir, "pw", "s3cret\n", 0o600)
	writeConfig(t, dir, "sub/token", "t0ken\n", 0o600)
	cfg, err := parseArgs([]string{"--config", path, "--server", "wss://e/", "--ca-file", ""}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if cfg.password != "s3cret" || cfg.token != "t0ken" || cfg.dataDir != filepath.Join(filepath.Dir(dir), "docs") {
		t.Errorf("got password %q, token %q, data dir %q; want those of %s", cfg.password, cfg.token, cfg.dataDir, dir)
	}
}

// TestConfigBasicCommand checks [basic] command: the first line of its
// output is the password; a failure, a timeout or no output is an error
// that names the command and never shows the secret.
func TestConfigBasicCommand(t *testing.T) {
	saved := secretCommandTimeout
	secretCommandTimeout = time.Second // the bound of the timeout case
	t.Cleanup(func() { secretCommandTimeout = saved })
	dir := t.TempDir()
	secretFile := writeConfig(t, dir, "secret", "s3cret\nsecond line\n", 0o600)
	tests := []struct {
		name    string
		command string
		want    string
		wantErr string
	}{
		{"array", fmt.Sprintf("[%q, %q]", "cat", secretFile), "s3cret", ""},
		{"string of words", fmt.Sprintf("%q", "cat "+secretFile), "s3cret", ""},
		{"a later table wins", fmt.Sprintf("[%q, %q]\n[service]\npassword = 'plain'", "cat", secretFile), "plain", ""},
		{"non-zero exit", `["sh", "-c", "cat >/dev/null; echo no such entry >&2; exit 3"]`, "", `command "sh -c cat >/dev/null; echo no such entry >&2; exit 3": exit status 3: no such entry`},
		{"not found", `["/nonexistent/pass"]`, "", `command "/nonexistent/pass"`},
		{"timeout", `["sleep", "30"]`, "", `command "sleep 30": no answer within 1s`},
		// The background sleep holds the output pipe past the kill of sh;
		// the test kills it by the pid it wrote.
		{"timeout, a child holds the pipe", fmt.Sprintf(`["sh", "-c", "sleep 60 & echo $! > %s; wait"]`, filepath.Join(dir, "pid")), "", "no answer within 1s"},
		{"empty first line", `["printf", "\\nmore"]`, "", "printed nothing on its first line"},
		{"empty array", `[]`, "", "want the command's words as an array"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeConfig(t, dir, "elva.toml", "[basic]\nuser = 'ada'\ncommand = "+tt.command+"\n", 0o600)
			cfg, err := parseArgs([]string{"--config", path, "--server", "wss://e/"}, func(string) string { return "" })
			if err == nil {
				err = cfg.runPasswordCommand()
				killBackground(t, filepath.Join(dir, "pid"))
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "elva.toml:3") {
					t.Fatalf("got %v, want an error with %q at elva.toml:3", err, tt.wantErr)
				}
				return
			}
			if err != nil || cfg.password != tt.want {
				t.Fatalf("got %v, password %q; want %q", err, cfg.password, tt.want)
			}
		})
	}
}

// killBackground kills the process whose pid is in the file at path, if
// there is one, and removes the file: a test must leave no process.
func killBackground(t *testing.T, path string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		return
	}
	os.Remove(path)
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatalf("pid file %s: %v", path, err)
	}
	if p, err := os.FindProcess(pid); err == nil {
		p.Kill()
		p.Release()
	}
}

// TestPasswordCommandWhenNeeded checks that run runs the [basic] command
// only when the relay starts with a server and the password is to come
// from the command, and that its failure is a failure at run time (exit
// status 1), not a usage error.
func TestPasswordCommandWhenNeeded(t *testing.T) {
	dir := t.TempDir()
	ran := filepath.Join(dir, "ran")
	command := writeConfig(t, dir, "elva.toml", fmt.Sprintf("[basic]\nuser = 'ada'\ncommand = ['sh', '-c', 'echo >> %s; echo pw']\n", ran), 0o600)
	failing := writeConfig(t, dir, "failing.toml", "[basic]\nuser = 'ada'\ncommand = ['sh', '-c', 'echo locked >&2; exit 1']\n", 0o600)
	server := "ws://127.0.0.1:1/" // nothing listens; the relay stops before it tries
	tests := []struct {
		name   string
		args   []string
		env    map[string]string
		runs   bool
		status int
		stderr string
	}{
		{"with a server", []string{"--config", command, "--server", server}, nil, true, 0, ""},
		{"without a server", []string{"--config", command}, nil, false, 0, ""},
		{"--list-docs", []string{"--config", command, "--server", server, "--list-docs"}, nil, false, 0, ""},
		{"--remove-doc", []string{"--config", command, "--server", server, "--remove-doc", "none"}, nil, false, 1, "none"},
		{"--print-config", []string{"--config", command, "--server", server, "--print-config"}, nil, false, 0, ""},
		{"--password-file above", []string{"--config", command, "--server", server, "--password-file", writeConfig(t, dir, "pw", "pw\n", 0o600)}, nil, false, 0, ""},
		{"ELVA_PASSWORD above", []string{"--config", command, "--server", server}, map[string]string{"ELVA_PASSWORD": "pw"}, false, 0, ""},
		{"the server URI's password above", []string{"--config", command, "--server", "ws://bob:pw@127.0.0.1:1/"}, nil, false, 0, ""},
		{"failure", []string{"--config", failing, "--server", server}, nil, false, 1, "failing.toml:3 ([basic] command): command"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			os.Remove(ran)
			ctx, cancel := context.WithCancel(context.Background())
			cancel() // the relay stops as soon as it has started
			env := map[string]string{"ELVA_DATA_DIR": filepath.Join(dir, "data")}
			for k, v := range tt.env {
				env[k] = v
			}
			stderr := newLogBuffer()
			args := append(slices.Clone(tt.args), "--no-store", "127.0.0.1", "0")
			if slices.Contains(args, "--list-docs") || slices.Contains(args, "--remove-doc") {
				args = slices.DeleteFunc(args, func(a string) bool { return a == "--no-store" })
			}
			status := run(ctx, args, io.Discard, stderr, func(k string) string { return env[k] })
			_, err := os.Stat(ran)
			if runs := err == nil; runs != tt.runs || status != tt.status || !strings.Contains(stderr.String(), tt.stderr) {
				t.Errorf("command ran: %v, status %d, stderr:\n%s\nwant ran: %v, status %d, %q", runs, status, stderr.String(), tt.runs, tt.status, tt.stderr)
			}
			if strings.Contains(stderr.String(), "see --help") {
				t.Errorf("a usage error:\n%s", stderr.String())
			}
		})
	}
}

// TestPrintConfig checks --print-config: every setting with its source,
// the secrets redacted, the [basic] command not run.
func TestPrintConfig(t *testing.T) {
	dir := t.TempDir()
	ran := filepath.Join(dir, "ran")
	path := writeConfig(t, dir, "elva.toml", fmt.Sprintf(`[basic]
user = "ada"
command = ["touch", %q]
[service]
token = "t0psecret"
protocol = "hocuspocus"
max-connections = 7
`, ran), 0o600)
	var stdout, stderr bytes.Buffer
	env := map[string]string{"ELVA_SERVER": "wss://e.example.org/", "HOME": dir}
	getenv := func(k string) string { return env[k] }
	status := run(context.Background(), []string{"--config", path, "--print-config", "-v", "127.0.0.1"}, &stdout, &stderr, getenv)
	out := stdout.String()
	if status != 0 || stderr.Len() != 0 {
		t.Fatalf("status %d, stderr %q", status, stderr.String())
	}
	for _, want := range []string{
		"# configuration files, the later winning: " + path,
		"[service]\n",
		`host = "127.0.0.1"`, "# argument HOST",
		"port = 8000", "# default",
		`server = "wss://e.example.org/"`, "# env ELVA_SERVER",
		`user = "ada"`, "# file " + path + ":2 ([basic] user)",
		`password = "[redacted]"`, "# file " + path + `:3 ([basic] command) "touch ` + ran + `", not run for --print-config`,
		`token = "[redacted]"`, "# file " + path + ":5 ([service] token)",
		"max-connections = 7", "verbose = true", "# flag -v",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("no %q in\n%s", want, out)
		}
	}
	if strings.Contains(out, "t0psecret") {
		t.Errorf("the token is shown:\n%s", out)
	}
	if _, err := parseTOML("print-config", out, readAll); err != nil {
		t.Errorf("the output is not TOML this relay reads: %v", err)
	}
	// The environment's server URI brings its credentials, which beat
	// the file's.
	env["ELVA_SERVER"] = "wss://bob:pw-in-uri@e.example.org/"
	stdout.Reset()
	status = run(context.Background(), []string{"--config", path, "--print-config"}, &stdout, &stderr, getenv)
	out = stdout.String()
	for _, want := range []string{
		`server = "wss://bob:xxxxx@e.example.org/"`,
		`password = "[redacted]"                        # userinfo of the server URI, env ELVA_SERVER`,
		`user = "bob"                                   # userinfo of the server URI, env ELVA_SERVER`,
	} {
		if status != 0 || !strings.Contains(out, want) {
			t.Errorf("status %d; no %q in\n%s", status, want, out)
		}
	}
	if strings.Contains(out, "pw-in-uri") {
		t.Errorf("the password in the URI is shown:\n%s", out)
	}
	if _, err := os.Stat(ran); err == nil {
		t.Error("--print-config ran the [basic] command")
	}
}

// TestConfigFileModeWarning checks the warning for a password in a file
// that others may read, and none for one only its owner may read.
func TestConfigFileModeWarning(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name    string
		content string
		mode    os.FileMode
		warned  bool
	}{
		{"password readable by others", "[basic]\nsecret = 'x'", 0o644, true},
		{"token readable by the group", "[service]\ntoken = 'x'", 0o640, true},
		{"password for the owner only", "[basic]\nsecret = 'x'", 0o600, false},
		{"no secret", "[basic]\nuser = 'ada'", 0o644, false},
		{"a command is no secret", "[basic]\ncommand = ['true']", 0o644, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeConfig(t, dir, "elva.toml", tt.content, tt.mode)
			fc := &fileConfig{settings: make(map[string]fileSetting)}
			fs := flag.NewFlagSet("test", flag.ContinueOnError)
			defineFlags(fs, func(string) string { return "" })
			if err := fc.read(path, settingKinds(fs), false); err != nil {
				t.Fatal(err)
			}
			warned := len(fc.warnings) == 1 && strings.Contains(fc.warnings[0], "chmod 600")
			if warned != tt.warned {
				t.Errorf("warnings %q, want a chmod warning: %v", fc.warnings, tt.warned)
			}
		})
	}
}

// TestLogFileReopensOnSIGHUP checks that after the --log file was moved
// away (as logrotate does), SIGHUP makes the relay log to a new file at
// the path, and the lines before it stay in the moved one.
func TestLogFileReopensOnSIGHUP(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "relay.log")
	lf, err := openLogFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	seen := newLogBuffer()
	log := slog.New(slog.NewTextHandler(io.MultiWriter(lf, seen), nil))
	stop := reopenOnHangup(lf, log)
	defer stop() // once more if the test ends early
	log.Info("before the rotation")
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	seen.waitFor(t, "log file reopened") // written to the new file
	log.Info("after the rotation")
	stop()
	for _, tt := range []struct {
		file      string
		want, not string
	}{
		{path + ".1", "before the rotation", "after the rotation"},
		{path, "after the rotation", "before the rotation"},
	} {
		data, err := os.ReadFile(tt.file)
		if err != nil || !strings.Contains(string(data), tt.want) || strings.Contains(string(data), tt.not) {
			t.Errorf("%s: %v, %q; want %q and not %q", tt.file, err, data, tt.want, tt.not)
		}
	}
}

// TestSIGHUPWithoutLogFile checks that a SIGHUP to a relay that logs to
// stderr is logged and ignored: the process lives on (a SIGHUP with no
// handler would end this very test binary).
func TestSIGHUPWithoutLogFile(t *testing.T) {
	seen := newLogBuffer()
	stop := reopenOnHangup(nil, slog.New(slog.NewTextHandler(seen, nil)))
	defer stop()
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	seen.waitFor(t, "SIGHUP ignored")
}

// TestLogOptions runs the relay with the log options and checks what it
// writes: JSON lines that parse, warnings only with --quiet, and with
// --log one line on stderr that says where the log goes.
func TestLogOptions(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name  string
		args  []string
		check func(t *testing.T, stderr, logFile string)
	}{
		{"json", []string{"--log-format", "json"}, func(t *testing.T, stderr, _ string) {
			for _, line := range strings.Split(strings.TrimSpace(stderr), "\n") {
				var obj map[string]any
				if err := json.Unmarshal([]byte(line), &obj); err != nil || obj["msg"] == nil || obj["level"] == nil {
					t.Errorf("line %q: %v, want a JSON object with msg and level", line, err)
				}
			}
		}},
		{"quiet", []string{"--quiet"}, func(t *testing.T, stderr, _ string) {
			if strings.Contains(stderr, "level=INFO") || !strings.Contains(stderr, "level=WARN") {
				t.Errorf("want warnings only:\n%s", stderr)
			}
		}},
		{"log file", []string{"--log", filepath.Join(dir, "relay.log")}, func(t *testing.T, stderr, logFile string) {
			if want := "elva-service: logging to " + filepath.Join(dir, "relay.log") + "\n"; stderr != want {
				t.Errorf("stderr %q, want %q", stderr, want)
			}
			if !strings.Contains(logFile, "msg=listening") {
				t.Errorf("the log file has no listening line:\n%s", logFile)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// --no-store without a server logs a warning at the start: the
			// last start line, at every level.
			args := append(tt.args, "--no-store", "127.0.0.1", "0")
			ctx, cancel := context.WithCancel(context.Background())
			stderr, status := newLogBuffer(), make(chan int, 1)
			go func() { status <- run(ctx, args, io.Discard, stderr, func(string) string { return "" }) }()
			var logFile []byte
			if i := slices.Index(args, "--log"); i >= 0 {
				stderr.waitFor(t, "logging to")
				logFile = waitForFileLine(t, args[i+1], "no server and --no-store")
			} else {
				stderr.waitFor(t, "no server and --no-store")
			}
			cancel()
			select {
			case code := <-status:
				if code != 0 {
					t.Errorf("exit status %d:\n%s%s", code, stderr.String(), logFile)
				}
			case <-time.After(testTimeout):
				t.Fatal("the relay did not stop")
			}
			tt.check(t, stderr.String(), string(logFile))
		})
	}
}

// filePollInterval is how often waitForFileLine reads its file again.
const filePollInterval = 10 * time.Millisecond

// waitForFileLine waits until the file at path has a line with substr,
// written by another goroutine, and returns the file's content. The file
// gives no event to wait on: it is read every filePollInterval, up to
// testTimeout.
func waitForFileLine(t *testing.T, path, substr string) []byte {
	t.Helper()
	deadline := time.After(testTimeout)
	tick := time.NewTicker(filePollInterval)
	defer tick.Stop()
	for {
		data, _ := os.ReadFile(path)
		if bytes.Contains(data, []byte(substr)) {
			return data
		}
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("no line with %q in %s:\n%s", substr, path, data)
		}
	}
}

// TestProjectFileSettings checks that the elva.toml found in the
// directory tree, which may have come with a cloned repository or been
// put in /tmp by another user, gives only the settings on its list: the
// others are refused with the file, the line, the key and the reason; the
// user's own file gives them all.
func TestProjectFileSettings(t *testing.T) {
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	defineFlags(fs, func(string) string { return "" })
	kinds := settingKinds(fs)
	tests := []struct {
		content string
		key     string // the setting taken; "" if refused
		why     string // in the refusal
	}{
		{"[basic]\ncommand = ['sh', '-c', 'echo pwned']", "", "run a command"},
		{"[service]\npassword-file = '/home/ada/.netrc'", "", "read a secret from a file"},
		{"[service]\ntoken-file = '/home/ada/.netrc'", "", "read a secret from a file"},
		{"[log]\nfile = '/home/ada/.bashrc'", "", "a file for the relay to write to"},
		{"[app.service]\nlog = '/home/ada/.bashrc'", "", "a file for the relay to write to"},
		{"[service]\nlog = 'relay.log'", "", "a file for the relay to write to"},
		{"[service]\nhost = '0.0.0.0'", "", "the address the relay listens on"},
		{"[app.default]\nhost = '0.0.0.0'", "", "the address the relay listens on"},
		{"[service]\nallow-origin = ['https://evil.example']", "", "web pages"},
		{"[service]\nallow-insecure-auth = true", "", "clear text"},
		{"[tls]\ncafile = 'evil.pem'", "", "whom the relay trusts"},
		{"[service]\nca-file = 'evil.pem'", "", "whom the relay trusts"},
		{"[service]\ndata-dir = '/tmp/docs'", "", "where your documents are kept"},
		{"[service]\nno-store = true", "", "off the disk"},
		{"[basic]\nsecret = 'x'", "", "a secret"},
		{"[app.default]\npassword = 'x'", "", "a secret"},
		{"[service]\ntoken = 'x'", "", "a secret"},
		{"[service]\nserver = 'wss://bob:pw@evil.example/'", "", "a password in the server URI"},
		{"[service]\nserver = 'wss://evil.example/'", "server", ""},
		{"[service]\nserver = 'wss://bob@evil.example/'", "server", ""},
		{"[connect]\nhost = 'evil.example'", "server", ""},
		{"[basic]\nuser = 'ada'", "user", ""},
		{"[service]\nprotocol = 'yjs'", "protocol", ""},
		{"[service]\nid-magic = '4944'", "id-magic", ""},
		{"[service]\nmax-connections = 5", "max-connections", ""},
		{"[service]\nupstream-max-message = '64KiB'", "upstream-max-message", ""},
		{"[service]\nping-interval = '5s'", "ping-interval", ""},
		{"[service]\nupstream-grace = '5s'", "upstream-grace", ""},
		{"[service]\nfsync-interval = '1s'", "fsync-interval", ""},
		{"[log]\nlevel = 'DEBUG'", "level", ""},
		{"[service]\nquiet = true", "level", ""},
		{"[service]\nlog-format = 'json'", "log-format", ""},
		{"[service]\nport = 9000", "port", ""},
	}
	for _, tt := range tests {
		t.Run(tt.content, func(t *testing.T) {
			root := t.TempDir()
			xdg := filepath.Join(root, "xdg")
			getenv := func(k string) string { return map[string]string{"XDG_CONFIG_HOME": xdg}[k] }
			project := writeConfig(t, root, "repo/elva.toml", tt.content, 0o600)
			fc, err := readConfigFiles("", filepath.Join(root, "repo"), getenv, kinds)
			switch {
			case tt.key != "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tt.key != "":
				if s, ok := fc.settings[tt.key]; !ok || !s.project {
					t.Errorf("%s not taken as the project file's: %+v", tt.key, fc.settings)
				}
				return
			case err == nil:
				t.Fatalf("taken from a project file: %+v", fc.settings)
			}
			for _, want := range []string{project + ":2: [", "refused from a project file", "may be anyone's", tt.why, "--config"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("got %v, want %q in it", err, want)
				}
			}
			writeConfig(t, xdg, "elva/elva.toml", tt.content, 0o600)
			if err := os.Remove(project); err != nil {
				t.Fatal(err)
			}
			if _, err := readConfigFiles("", filepath.Join(root, "repo"), getenv, kinds); err != nil {
				t.Errorf("in the user's file: %v", err)
			}
		})
	}
}

// TestProjectFileOwnerAndMode checks that a project file that someone
// else could have written, by owning it or by its mode, is skipped with a
// warning (as git skips another user's repository), and that the user's
// own file is not held to this.
func TestProjectFileOwnerAndMode(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("Windows files have no owner id and mode bits to check")
	}
	tests := []struct {
		name    string
		mode    os.FileMode
		owner   int // -1: the test's user
		skipped string
	}{
		{"the user's, for the user only", 0o600, -1, ""},
		{"the user's, readable by all", 0o644, -1, ""},
		{"writable by the group", 0o664, -1, "others may change it (mode 0664"},
		{"writable by all", 0o646, -1, "others may change it (mode 0646"},
		{"another user's", 0o644, 65534, "it belongs to user 65534, not to you"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			project := writeConfig(t, root, "repo/elva.toml", "[service]\nport = 9123\n", tt.mode)
			if tt.owner >= 0 {
				if os.Getuid() != 0 {
					t.Skip("only root can give a file to another user")
				}
				if err := os.Chown(project, tt.owner, -1); err != nil {
					t.Fatal(err)
				}
			}
			var stdout, stderr bytes.Buffer
			getenv := func(string) string { return "" }
			cfg, err := parseArgsIn([]string{"--print-config", "--no-store"}, getenv, filepath.Join(root, "repo"))
			if err != nil {
				t.Fatal(err)
			}
			printConfig(&stdout, cfg)
			warnings := strings.Join(cfg.warnings, "\n")
			if tt.skipped == "" {
				if cfg.port != 9123 || warnings != "" {
					t.Errorf("port %d, warnings %q; want the file's port 9123 and no warning", cfg.port, warnings)
				}
				return
			}
			if cfg.port != 8000 || len(cfg.configFiles) != 0 {
				t.Errorf("port %d from %v; want the default 8000, no file read", cfg.port, cfg.configFiles)
			}
			want := "project file " + project + " skipped: " + tt.skipped
			if !strings.Contains(warnings, want) || !strings.Contains(stdout.String(), "# warning: "+want) || stderr.Len() != 0 {
				t.Errorf("warnings %q, --print-config:\n%s\nwant %q in both", warnings, stdout.String(), want)
			}
			// The same file as the user's own is read.
			if err := os.Rename(filepath.Join(root, "repo"), filepath.Join(root, "elva")); err != nil {
				t.Fatal(err)
			}
			cfg, err = parseArgsIn(nil, func(k string) string { return map[string]string{"XDG_CONFIG_HOME": root}[k] }, "")
			if err != nil || cfg.port != 9123 {
				t.Errorf("as the user's file: %v, port %d; want 9123", err, cfg.port)
			}
		})
	}
	// Another owner, for any test user: the check itself.
	f, err := os.Open(writeConfig(t, t.TempDir(), "elva.toml", "", 0o600))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := checkProjectFile(f, os.Getuid()+1); !errors.Is(err, errUnsafeProject) || !strings.Contains(err.Error(), "not to you") {
		t.Errorf("a file of user %d checked for user %d: %v, want errUnsafeProject", os.Getuid(), os.Getuid()+1, err)
	}
}

// TestProjectFileCannotRedirectCredentials is the attack a project file
// could make: the user's file holds the credentials; the project file,
// read after it, names a server of its own and opens the relay up. The
// settings that open it up are refused; the server alone is taken, and
// the start warns that the credentials go to it.
func TestProjectFileCannotRedirectCredentials(t *testing.T) {
	root := t.TempDir()
	xdg := filepath.Join(root, "xdg")
	writeConfig(t, xdg, "elva/elva.toml", "[basic]\nuser = 'ada'\nsecret = 's3cret'\n", 0o600)
	getenv := func(k string) string { return map[string]string{"XDG_CONFIG_HOME": xdg, "HOME": root}[k] }
	sub := filepath.Join(root, "repo", "sub")
	if err := os.MkdirAll(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	project := writeConfig(t, root, "repo/elva.toml", `[service]
server = "wss://attacker.example:9/"
allow-insecure-auth = true
allow-origin = ["https://evil.example"]
host = "0.0.0.0"
`, 0o600)
	_, err := parseArgsIn([]string{"--print-config"}, getenv, sub)
	if err == nil || !strings.Contains(err.Error(), project+":3: [service] allow-insecure-auth: refused from a project file") {
		t.Fatalf("got %v, want allow-insecure-auth refused at %s:3", err, project)
	}
	user := filepath.Join(xdg, "elva", "elva.toml")
	warning := "the server wss://attacker.example:9/ comes from the project file " + project + ":2 ([service] server), and credentials it did not give go to it: " +
		"the user name (file " + user + ":2 ([basic] user)), the password (file " + user + ":3 ([basic] secret))"
	tests := []struct {
		name    string
		project string
		args    []string
		warned  string
	}{
		{"the user's credentials", "[service]\nserver = \"wss://attacker.example:9/\"\n", nil, warning},
		{"the project's user name", "[service]\nserver = \"wss://attacker.example:9/\"\nuser = 'eve'\n", nil, "go to it: the password (file " + user + ":3 ([basic] secret));"},
		{"the server given by flag", "[service]\nserver = \"wss://attacker.example:9/\"\n", []string{"--server", "wss://mine.example/"}, ""},
		{"no server in the project file", "[service]\nport = 9001\n", nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			writeConfig(t, root, "repo/elva.toml", tt.project, 0o600)
			cfg, err := parseArgsIn(append([]string{"--print-config"}, tt.args...), getenv, sub)
			if err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			printConfig(&out, cfg)
			warnings := strings.Join(cfg.warnings, "\n")
			if tt.warned == "" {
				if strings.Contains(warnings, "comes from the project file") {
					t.Errorf("warned: %s", warnings)
				}
				return
			}
			if !strings.Contains(warnings, tt.warned) || !strings.Contains(out.String(), "# warning: the server wss://attacker.example:9/") {
				t.Errorf("warnings %q; --print-config:\n%s\nwant %q in both", warnings, out.String(), tt.warned)
			}
		})
	}
}

// TestConfigFilesLogged checks that the start logs which configuration
// files the relay read.
func TestConfigFilesLogged(t *testing.T) {
	path := writeConfig(t, t.TempDir(), "elva.toml", "[service]\nno-store = true\n", 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // the relay stops as soon as it has started
	stderr := newLogBuffer()
	if status := run(ctx, []string{"--config", path, "127.0.0.1", "0"}, io.Discard, stderr, func(string) string { return "" }); status != 0 {
		t.Fatalf("status %d:\n%s", status, stderr.String())
	}
	if want := `level=INFO msg="configuration file read" path=` + path + " project=false"; !strings.Contains(stderr.String(), want) {
		t.Errorf("no %q in\n%s", want, stderr.String())
	}
}

// FuzzParseTOML feeds the configuration file's reader any bytes: it must
// not panic, an error must name the file and a line (FILE:LINE: ...), and
// every value read must carry a line of the input.
func FuzzParseTOML(f *testing.F) {
	for _, seed := range []string{
		"[service]\nport = 8000\nallow-origin = [\"https://a.example\", 'b']\n",
		"[app.default]\nserver = \"ws://h:8000/\" # comment\nlevel = 'DEBUG'\n",
		"[connect]\nhost = \"h\"\nport = 443\nsecure = true\n[basic]\ncommand = [\"pass\", \"show\", \"elva\"]\n",
		"a = \"\\u00e9\\t\\\"\"\n[x.y.z]\n",
		"[[x]]\n", "a = {b = 1}\n", "a = 1.5\n", "a = \"\"\"\nx\"\"\"\n", "a.b = 1\n", "a = 1\na = 2\n",
		"[service]\nmax-message = \"32MiB\"\r\n", "\xff = 1\n", "[\"quoted table\"]\nk = 'v'\n",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, src string) {
		if len(src) > 1<<16 {
			return
		}
		entries, err := parseTOML("f.toml", src, func(string) bool { return true })
		if err != nil {
			msg := err.Error()
			rest, ok := strings.CutPrefix(msg, "f.toml:")
			if !ok || rest == "" || rest[0] < '0' || rest[0] > '9' {
				t.Fatalf("error %q does not start with f.toml:LINE", msg)
			}
			return
		}
		lines := strings.Count(src, "\n") + 1
		for _, e := range entries {
			if e.line < 1 || e.line > lines {
				t.Fatalf("entry %+v: line outside the input's %d lines", e, lines)
			}
		}
	})
}

// TestStatusPagePolicy: the page's policy names the hashes of its own
// inline script and style, and nothing that would let anything else run;
// a cross-site subrequest (an <img> on another site) is refused, a link
// followed from there is not.
func TestStatusPagePolicy(t *testing.T) {
	csp := contentSecurityPolicy(statusPage)
	for _, want := range []string{"default-src 'none'", "script-src 'sha256-", "style-src 'sha256-", "connect-src 'self'", "frame-ancestors 'none'"} {
		if !strings.Contains(csp, want) {
			t.Errorf("policy %q lacks %q", csp, want)
		}
	}
	if strings.Contains(csp, "unsafe") {
		t.Errorf("policy %q allows unsafe sources", csp)
	}
	if got := contentSecurityPolicy([]byte("<p>no script</p>")); !strings.Contains(got, "script-src 'none'") {
		t.Errorf("policy for a page without a script: %q", got)
	}
	r := startRelay(t)
	for _, tt := range []struct {
		name       string
		site, mode string
		want       int
	}{
		{"the page's own fetch", "same-origin", "cors", http.StatusOK},
		{"typed into the address bar", "none", "navigate", http.StatusOK},
		{"a link from another site", "cross-site", "navigate", http.StatusOK},
		{"an image on another site", "cross-site", "no-cors", http.StatusForbidden},
	} {
		req, _ := http.NewRequest("GET", "http://"+r.addr+"/metrics", nil)
		req.Header.Set("Sec-Fetch-Site", tt.site)
		req.Header.Set("Sec-Fetch-Mode", tt.mode)
		resp, err := (&http.Client{Timeout: testTimeout}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tt.want {
			t.Errorf("%s: %d, want %d", tt.name, resp.StatusCode, tt.want)
		}
	}
}

// TestUpgradeOnMetricsIsADocument: the status and metrics paths answer
// plain requests only; an editor's upgrade on /metrics joins the document
// named "metrics", which the metrics then show.
func TestUpgradeOnMetricsIsADocument(t *testing.T) {
	r := startRelay(t)
	join(t, r.addr, "metrics") // its awareness message comes back: it is an editor
	samples := parseExposition(t, httpGet(t, "http://"+r.addr+"/metrics", ""))
	if got := samples[`elva_document_editors{document="metrics"}`]; got != 1 {
		t.Errorf(`elva_document_editors{document="metrics"} = %v, want 1`, got)
	}
}
