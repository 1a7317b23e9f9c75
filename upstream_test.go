package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha1"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/websocket"
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
	pwFile := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pwFile, []byte(password+"\nignored second line\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, fromFile := range []bool{true, false} {
		srv := newELVAServer(t, magicSeed)
		srv.user, srv.password = user, password
		args := []string{"--server", srv.url(), "--user", user, "--password-file", pwFile}
		if !fromFile {
			args = []string{"--server", strings.Replace(srv.url(), "ws://", "ws://"+user+":"+password+"@", 1)}
		}
		r := startRelay(t, append(args, "-v", "--retry-max", "500ms")...)
		r.logs.waitFor(t, "upstream connected") // after a 401 and the Basic retry
		srv.waitConnected(t)                    // so that dropAll finds the connection
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

// TestStopFlushesWhileTheServerTalks stops the relay while its upstream
// queue is long and the server keeps sending: the upstream reader must not
// close the connection under the writer's flush.
func TestStopFlushesWhileTheServerTalks(t *testing.T) {
	var got atomic.Int64
	disconnected := make(chan struct{})
	srv := httptest.NewServer(websocket.Server{
		Handshake: func(*websocket.Config, *http.Request) error { return nil },
		Handler: func(ws *websocket.Conn) {
			defer close(disconnected)
			ws.PayloadType = websocket.BinaryFrame
			chatter := append(appendIDPrefix(nil, magicSeed, "burst"), awarenessMsg(99, 1, "{}")...)
			stop := make(chan struct{})
			defer close(stop)
			go func() {
				tick := time.NewTicker(2 * time.Millisecond)
				defer tick.Stop()
				for {
					select {
					case <-stop:
						return
					case <-tick.C:
					}
					if websocket.Message.Send(ws, chatter) != nil {
						return
					}
				}
			}()
			for {
				var data []byte
				if websocket.Message.Receive(ws, &data) != nil {
					return
				}
				if _, msg, err := splitIDFrame(magicSeed, data); err == nil && len(msg) > 1000 {
					got.Add(1)
					time.Sleep(time.Millisecond) // a slow server: the queue grows
				}
			}
		},
	})
	defer srv.Close()
	r := startRelay(t, "--server", "ws"+strings.TrimPrefix(srv.URL, "http")+"/")
	r.logs.waitFor(t, "upstream connected")
	ws := dialLocal(t, r.addr, "burst")
	payload := make([]byte, 16<<10)
	msg := append(appendVaruint([]byte{msgSync, syncUpdate}, uint64(len(payload))), payload...)
	const n = 1000
	for range n {
		send(t, ws, msg)
	}
	r.logs.waitFor(t, `msg="message from editor" doc=burst`)
	r.stop()
	r.waitExit(t)
	select {
	case <-disconnected:
	case <-time.After(testTimeout):
		t.Fatal("the relay did not close its upstream connection")
	}
	accepted := int64(strings.Count(r.logs.String(), `msg="message from editor" doc=burst`))
	if accepted == 0 || got.Load() != accepted {
		t.Errorf("the relay accepted %d updates, the server got %d", accepted, got.Load())
	}
}

func TestBackoff(t *testing.T) {
	b := backoff{max: 4 * time.Second}
	bounds := []time.Duration{500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second, 4 * time.Second}
	for range 200 { // the delays are random: try many
		b.reset()
		for i, bound := range bounds {
			if d := b.next(); d < 0 || d >= bound {
				t.Fatalf("attempt %d: %v, want [0, %v)", i, d, bound)
			}
		}
	}
	// Far past the cap, the shift must not overflow.
	b.attempt = 100
	if d := b.next(); d < 0 || d >= b.max {
		t.Errorf("attempt 100: %v, want [0, %v)", d, b.max)
	}
	// Full jitter: the delays spread over the range instead of sitting at it.
	var low, high int
	for range 1000 {
		b.reset()
		b.next()
		b.next()
		if d := b.next(); d < time.Second {
			low++
		} else {
			high++
		}
	}
	if low < 300 || high < 300 {
		t.Errorf("delays below/above half the bound: %d/%d of 1000, want both near 500", low, high)
	}
}

func TestCheckUpstreamRefusesNamesNoEditorCanHave(t *testing.T) {
	for _, doc := range []string{strings.Repeat("n", 300), "a\x00b", "a\nb", string([]byte{0xff})} {
		frame := append(appendIDPrefix(nil, magicSeed, doc), update1...)
		if _, err := checkUpstream(magicSeed, frame); err == nil {
			t.Errorf("a frame for %q was accepted", shorten(doc, 20))
		}
	}
}

// TestHostileHandshakeIsBounded runs the relay against servers that answer
// the upgrade with endless headers or a giant status line: the relay must
// give up at 64 KiB and log a short line, not grow without bound.
func TestHostileHandshakeIsBounded(t *testing.T) {
	for _, answer := range []struct {
		name  string
		start string
		fill  string
	}{
		{"endless headers", "HTTP/1.1 101 Switching Protocols\r\n", "X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"},
		{"giant status line", "HTTP/1.1 401 ", "a"},
	} {
		t.Run(answer.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go func() {
				for {
					conn, err := ln.Accept()
					if err != nil {
						return
					}
					go func() {
						defer conn.Close()
						conn.SetDeadline(time.Now().Add(testTimeout))
						buf := make([]byte, 4096)
						conn.Read(buf) // the request
						fill := []byte(strings.Repeat(answer.fill, 32<<10/len(answer.fill)))
						conn.Write([]byte(answer.start))
						for range 640 { // up to 20 MiB, or until the relay hangs up
							if _, err := conn.Write(fill); err != nil {
								return
							}
						}
					}()
				}
			}()
			r := startRelayAt(t, slog.LevelInfo, "--server", "ws://"+ln.Addr().String()+"/")
			line := r.logs.waitFor(t, "upstream unavailable")
			if len(line) > 2048 {
				t.Errorf("a %d-byte log line", len(line))
			}
			if !strings.Contains(line, "64 KiB") && !strings.Contains(line, "unreadable response") {
				t.Errorf("the line does not say what was wrong: %s", shorten(line, 300))
			}
		})
	}
}

// TestEveryNewReasonIsLoggedWithoutVerbose checks what a user sees at the
// default level: one warning per outage and per new reason, not only for
// the first failure after the relay started.
func TestEveryNewReasonIsLoggedWithoutVerbose(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	srv.refuse.Store(http.StatusServiceUnavailable)
	r := startRelayAt(t, slog.LevelInfo, "--server", srv.url(), "--retry-max", "500ms")
	r.logs.waitFor(t, "503 Service Unavailable")
	srv.refuse.Store(http.StatusForbidden)
	r.logs.waitFor(t, "403 Forbidden")
	srv.refuse.Store(0)
	r.logs.waitFor(t, "upstream connected")
	srv.waitConnected(t)
	srv.refuse.Store(http.StatusBadGateway)
	srv.dropAll()
	r.logs.waitFor(t, "upstream connection lost")
	r.logs.waitFor(t, "502 Bad Gateway") // after the loss, the reason is news again
	if strings.Contains(r.logs.String(), "level=DEBUG") {
		t.Error("debug lines at info level")
	}
}

// silentServer accepts TCP connections and never answers the upgrade, as
// a server that hangs does. It returns the ws:// URL.
func silentServer(t *testing.T) *url.URL {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	return &url.URL{Scheme: "ws", Host: ln.Addr().String(), Path: "/"}
}

// requestServer hands each connection to the test once it has read its
// upgrade request, so that the test decides when and what to answer.
func requestServer(t *testing.T) (*url.URL, <-chan net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	conns := make(chan net.Conn)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				c.SetDeadline(time.Now().Add(testTimeout))
				if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
					c.Close()
					return
				}
				conns <- c
			}()
		}
	}()
	return &url.URL{Scheme: "ws", Host: ln.Addr().String(), Path: "/"}, conns
}

// TestHandshakeTimeoutsAndStopsNeverCrash runs many handshakes against a
// server that never answers, with short timeouts, and stops handshakes
// while a refusal arrives: the callback that closes the connection on
// cancel once read a result that the function's return had set to nil,
// which crashed the relay. Under -race this also catches the data race.
func TestHandshakeTimeoutsAndStopsNeverCrash(t *testing.T) {
	t.Run("silent server", func(t *testing.T) {
		u := &upstream{url: silentServer(t), log: discard, handshakeTimeout: 5 * time.Millisecond}
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range 25 {
					ws, _, err := u.handshake(context.Background())
					if err == nil || ws != nil {
						t.Errorf("handshake with a silent server: got %v, %v; want an error", ws, err)
						return
					}
				}
			}()
		}
		wg.Wait()
	})
	t.Run("stop during a refusal", func(t *testing.T) {
		addr, conns := requestServer(t)
		u := &upstream{url: addr, log: discard}
		for i := range 50 {
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() {
				_, _, err := u.handshake(ctx)
				done <- err
			}()
			c := <-conns
			go cancel() // the stop races the refusal
			io.WriteString(c, "HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
			if err := <-done; err == nil {
				t.Errorf("handshake %d: got no error", i)
			}
			c.Close()
		}
	})
}

// closingServer upgrades the relay's connection by hand, sends a close
// frame with code 4000 and the reason "bye", and hands the test what the
// relay answers: the opcode and payload of its next frame.
func closingServer(t *testing.T) (*url.URL, <-chan []byte) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	answers := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(testTimeout))
		br := bufio.NewReader(c)
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		sum := sha1.Sum([]byte(req.Header.Get("Sec-WebSocket-Key") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
		fmt.Fprintf(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
			base64.StdEncoding.EncodeToString(sum[:]))
		c.Write([]byte{0x88, 5, 0x0f, 0xa0, 'b', 'y', 'e'})
		for {
			op, payload := readFrame(t, br)
			if op == websocket.CloseFrame {
				answers <- append([]byte{op}, payload...)
				return
			}
		}
	}()
	return &url.URL{Scheme: "ws", Host: ln.Addr().String(), Path: "/"}, answers
}

// TestUpstreamCloseIsAnsweredAndLogged checks that the relay answers the
// server's close frame with one of its own, echoing the code (RFC 6455
// §5.5.1), rather than dropping the socket (which the server sees as
// 1006), and logs the server's code and reason.
func TestUpstreamCloseIsAnsweredAndLogged(t *testing.T) {
	srv, answers := closingServer(t)
	r := startRelay(t, "--server", srv.String())
	select {
	case got := <-answers:
		if len(got) < 3 || got[0] != websocket.CloseFrame || int(got[1])<<8|int(got[2]) != 4000 {
			t.Errorf("answer % x, want a close frame with code 4000", got)
		}
	case <-time.After(testTimeout):
		t.Fatal("the relay never answered the close frame")
	}
	line := r.logs.waitFor(t, "upstream connection lost")
	if !strings.Contains(line, "4000") || !strings.Contains(line, "bye") {
		t.Errorf("the log does not name the server's code and reason: %s", line)
	}
}

// pathServer is an in-test plain Yjs server of the kind --protocol yjs
// talks to: one WebSocket per document, the room named by the raw request
// target. It hands the test each connection with its raw target, and its
// frames; the test answers through the connection.
type pathServer struct {
	srv     *httptest.Server
	conns   chan pathServerConn
	targets sync.Map // remote address → the raw request target it sent
}

// pathServerConn is one document's connection as the server sees it.
type pathServerConn struct {
	target string // the request target as sent, e.g. /100%%20sure
	ws     *websocket.Conn
	frames chan []byte // closed when the relay closes the connection
}

// newPathServer starts the server until the test ends.
func newPathServer(t *testing.T) *pathServer {
	t.Helper()
	s := &pathServer{conns: make(chan pathServerConn, 16)}
	var upgrade http.Handler = websocket.Server{
		Handshake: func(*websocket.Config, *http.Request) error { return nil },
		Handler: func(ws *websocket.Conn) {
			ws.PayloadType = websocket.BinaryFrame
			target, _ := s.targets.Load(ws.Request().RemoteAddr)
			c := pathServerConn{target: target.(string), ws: ws, frames: make(chan []byte, 64)}
			s.conns <- c
			defer close(c.frames)
			for {
				var msg []byte
				if websocket.Message.Receive(ws, &msg) != nil {
					return
				}
				c.frames <- msg
			}
		},
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/locked") { // for one document only
			http.Error(w, "not for you", http.StatusUnauthorized)
			return
		}
		upgrade.ServeHTTP(w, r)
	})
	s.srv = httptest.NewUnstartedServer(handler)
	// Node servers take a literal % in the target; Go's needs the relay's
	// own rewrite for that. The raw target is kept first.
	s.srv.Listener = percentListener{targetListener{s.srv.Listener, &s.targets}}
	s.srv.Start()
	t.Cleanup(s.srv.Close)
	return s
}

// targetListener notes the raw request target of each connection's first
// request line, by remote address.
type targetListener struct {
	net.Listener
	targets *sync.Map
}

// Accept wraps the connection to note its target.
func (l targetListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &targetConn{Conn: c, targets: l.targets}, nil
}

// targetConn notes the target of the request line that passes through it.
type targetConn struct {
	net.Conn
	targets *sync.Map
	line    []byte
	noted   bool
}

// Read passes the bytes on and notes the request line's target.
func (c *targetConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if !c.noted {
		c.line = append(c.line, p[:n]...)
		if i := bytes.IndexByte(c.line, '\n'); i >= 0 {
			fields := strings.Fields(string(c.line[:i]))
			if len(fields) == 3 {
				c.targets.Store(c.RemoteAddr().String(), fields[1])
			}
			c.noted, c.line = true, nil
		}
	}
	return n, err
}

// url is the server's base address for --server.
func (s *pathServer) url() string { return "ws://" + s.srv.Listener.Addr().String() + "/" }

// next returns the next connection the relay opened.
func (s *pathServer) next(t *testing.T) pathServerConn {
	t.Helper()
	select {
	case c := <-s.conns:
		return c
	case <-time.After(testTimeout):
		t.Fatal("the relay opened no connection")
		return pathServerConn{}
	}
}

// expectFrame waits for want among c's frames, skipping others.
func (c pathServerConn) expectFrame(t *testing.T, want []byte) {
	t.Helper()
	deadline := time.After(testTimeout)
	for {
		select {
		case got, ok := <-c.frames:
			if !ok {
				t.Fatalf("%s closed before % x came", c.target, want)
			}
			if bytes.Equal(got, want) {
				return
			}
		case <-deadline:
			t.Fatalf("%s: % x never came", c.target, want)
		}
	}
}

// TestYjsModeOneConnectionPerDocument checks --protocol yjs against an
// in-test server: each document gets its own connection at SERVER/<name>,
// escaped as a browser escapes it, which is resynced when it comes up and
// carries that document's messages only, both ways; the connection closes
// after the grace once the last editor has left.
func TestYjsModeOneConnectionPerDocument(t *testing.T) {
	srv := newPathServer(t)
	r := startRelay(t, "--protocol", "yjs", "--server", srv.url(), "--upstream-grace", "50ms")
	a := join(t, r.addr, "100%25%20sure") // the document "100% sure"
	up := srv.next(t)
	if up.target != "/100%%20sure" {
		t.Errorf("request target %q, want /100%%%%20sure as a browser sends it", up.target)
	}
	up.expectFrame(t, emptyStep1) // the resync
	send(t, a, update1)
	up.expectFrame(t, update1)
	send(t, up.ws, update2)
	receiveSkipping(t, a, func(m []byte) bool { return bytes.Equal(m, update2) })

	b := join(t, r.addr, "other")
	other := srv.next(t)
	if other.target != "/other" {
		t.Errorf("request target %q, want /other", other.target)
	}
	other.expectFrame(t, emptyStep1) // up: what b sent before is resynced
	send(t, b, update2)
	other.expectFrame(t, update2)

	a.Close()
	r.logs.waitFor(t, `msg="upstream closed" doc="100% sure"`)
	for range up.frames { // drained until the relay closes it
	}
	send(t, b, update1) // the other document is untouched
	other.expectFrame(t, update1)
}

// hpFrameOf builds a Hocuspocus frame: varString(doc) then msg.
func hpFrameOf(doc string, msg []byte) []byte {
	return append(append(appendVaruint(nil, uint64(len(doc))), doc...), msg...)
}

// hpAuthAnswer is the server's answer to an Auth: sub 2 with a scope is
// "authenticated", sub 1 with a reason "permission denied".
func hpAuthAnswer(sub byte, text string) []byte {
	return append(appendVaruint([]byte{msgAuth, sub}, uint64(len(text))), text...)
}

// TestHocuspocusModeAuthenticatesHoldsAndFilters checks --protocol
// hocuspocus against an in-test server that speaks its framing: each
// document's Auth, with the token, comes before anything else of it; the
// relay holds the document's messages until the server answers; the
// server's echo and the messages only Hocuspocus knows never reach an
// editor; a refused document is named once and stays among its local
// editors; a close for one document makes the relay authenticate it
// again.
func TestHocuspocusModeAuthenticatesHoldsAndFilters(t *testing.T) {
	srv := newPathServer(t)
	r := startRelay(t, "--protocol", "hocuspocus", "--server", srv.url(), "--token", "s3cret")
	up := srv.next(t)
	r.logs.waitFor(t, "upstream connected") // so the editor's first message meets the socket
	a := join(t, r.addr, "notes")
	auth := hpFrameOf("notes", append([]byte{msgAuth, 0, 6}, "s3cret"...))
	first := <-up.frames
	if !bytes.Equal(first, auth) {
		t.Fatalf("first frame % x, want the Auth % x", first, auth)
	}
	select {
	case f := <-up.frames:
		t.Fatalf("% x sent before the server answered the Auth", f)
	default:
	}
	send(t, up.ws, hpFrameOf("notes", hpAuthAnswer(2, "read-write")))
	up.expectFrame(t, hpFrameOf("notes", []byte{msgAwareness, 1, 0})) // join's, held until now

	send(t, a, update1)
	up.expectFrame(t, hpFrameOf("notes", update1))
	send(t, up.ws, hpFrameOf("notes", update1))                     // the echo
	send(t, up.ws, hpFrameOf("notes", []byte{hpSyncStatus, 1}))     // sync status
	send(t, up.ws, hpFrameOf("notes", []byte{hpStateless, 1, 'x'})) // stateless
	send(t, up.ws, hpFrameOf("notes", update2))                     // news
	got := receiveSkipping(t, a, func(m []byte) bool { return m[0] == msgSync && m[1] == syncUpdate })
	if !bytes.Equal(got, update2) {
		t.Errorf("the editor got % x first, want only the server's news % x", got, update2)
	}

	b := join(t, r.addr, "secret")
	up.expectFrame(t, hpFrameOf("secret", append([]byte{msgAuth, 0, 6}, "s3cret"...)))
	send(t, up.ws, hpFrameOf("secret", hpAuthAnswer(1, "not yours")))
	line := r.logs.waitFor(t, "upstream refused the document")
	if !strings.Contains(line, `doc=secret`) || !strings.Contains(line, "not yours") {
		t.Errorf("the refusal does not name the document and the reason: %s", line)
	}
	b2 := join(t, r.addr, "secret")
	send(t, b, update1)
	receiveSkipping(t, b2, func(m []byte) bool { return bytes.Equal(m, update1) })

	send(t, up.ws, hpFrameOf("notes", append([]byte{hpClose, 5}, "reset"...)))
	up.expectFrame(t, auth) // authenticated again
	if n := strings.Count(r.logs.String(), "upstream refused the document"); n != 1 {
		t.Errorf("the refusal logged %d times, want once", n)
	}
	if strings.Contains(r.logs.String(), "s3cret") {
		t.Error("the token is in the log")
	}
}

// FuzzHocuspocusDecode checks that any frame from a Hocuspocus server
// decodes without a panic, and that a decoded one encodes to a frame that
// decodes the same (lengths may come in an overlong form that lib0 takes).
func FuzzHocuspocusDecode(f *testing.F) {
	f.Add(hpFrameOf("notes", emptyStep1))
	f.Add(hpFrameOf("notes", hpAuthAnswer(2, "read-write")))
	f.Add(hpFrameOf("notes", []byte{hpClose, 5, 'r', 'e', 's', 'e', 't'}))
	f.Add(hpFrameOf("notes", awarenessMsg(1, 1, "{}")))
	f.Fuzz(func(t *testing.T, data []byte) {
		fr, err := hpFraming{}.decode(data)
		if err != nil {
			return
		}
		again, err := hpFraming{}.decode(hpFrameOf(fr.doc, fr.data))
		if err != nil || again.doc != fr.doc || !bytes.Equal(again.data, fr.data) {
			t.Errorf("% x decoded to %q + % x, which does not round-trip: %v", data, fr.doc, fr.data, err)
		}
		if fr.kind == msgAuth && len(fr.data) > 0 && fr.data[0] != msgAuth {
			t.Errorf("kind %d for % x", fr.kind, fr.data)
		}
	})
}

// TestYjsModeA401RefusesOneDocument checks that in yjs mode a server that
// answers 401 for one document refuses that document only: it is logged
// with the server's answer, the relay goes on, and another document works.
func TestYjsModeA401RefusesOneDocument(t *testing.T) {
	srv := newPathServer(t)
	r := startRelay(t, "--protocol", "yjs", "--server", srv.url(), "--user", "ada", "--password", "pw")
	join(t, r.addr, "locked")
	line := r.logs.waitFor(t, "upstream unavailable")
	if !strings.Contains(line, "401") || !strings.Contains(line, `doc=locked`) {
		t.Errorf("the refusal does not name the document and the status: %s", line)
	}
	b := join(t, r.addr, "open")
	up := srv.next(t)
	up.expectFrame(t, emptyStep1)
	send(t, b, update1)
	up.expectFrame(t, update1)
	if strings.Contains(r.logs.String(), "upstream failed; stopping") {
		t.Error("one document's 401 stopped the relay")
	}
}

// TestHocuspocusModeClosesIdleDocuments checks that a document whose last
// local editor left is closed on the socket after the grace, and that an
// editor coming back after the server's answer authenticates it again.
func TestHocuspocusModeClosesIdleDocuments(t *testing.T) {
	srv := newPathServer(t)
	r := startRelay(t, "--protocol", "hocuspocus", "--server", srv.url(), "--upstream-grace", "50ms")
	up := srv.next(t)
	r.logs.waitFor(t, "upstream connected")
	a := join(t, r.addr, "notes")
	auth := hpFrameOf("notes", []byte{msgAuth, 0, 0})
	up.expectFrame(t, auth)
	send(t, up.ws, hpFrameOf("notes", hpAuthAnswer(2, "read-write")))
	a.Close()
	closing := hpFrameOf("notes", append([]byte{hpClose, 18}, "provider_initiated"...))
	up.expectFrame(t, closing)
	send(t, up.ws, closing) // the server's answer
	r.logs.waitFor(t, `msg="upstream closed" doc=notes`)
	join(t, r.addr, "notes")
	up.expectFrame(t, auth) // open again
}

// TestUpstreamStatsState follows the upstream's state through sequences
// of connections made, ended, lost and failed, as yjs mode's per-document
// connections interleave them.
func TestUpstreamStatsState(t *testing.T) {
	lostErr := &peerCloseError{code: 1012}
	tests := []struct {
		name       string
		events     string // u: up, U: up again, d: down, l: lost (close 1012), f: failed
		want       string
		reconnects int64
		lastClose  int64
		since      bool
	}{
		{"nothing yet", "", "connecting", 0, 0, false},
		{"first attempt failed", "f", "disconnected", 0, 0, false},
		{"up", "u", "connected", 0, 0, true},
		{"up after failures", "ffu", "connected", 0, 0, true},
		{"lost", "udl", "disconnected", 0, 1012, false},
		{"lost and back", "udlU", "connected", 1, 1012, true},
		{"closed after its grace", "ud", "idle", 0, 0, false},
		{"two documents, one closed", "uud", "connected", 0, 0, true},
		{"two documents, both closed", "uudd", "idle", 0, 0, false},
		{"one lost while another is up", "uudl", "connected", 0, 1012, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &upstreamStats{}
			for _, ev := range tt.events {
				switch ev {
				case 'u':
					s.up(false)
				case 'U':
					s.up(true)
				case 'd':
					s.down()
				case 'l':
					s.lost(lostErr)
				case 'f':
					s.failed(errors.New("dial: refused"))
				}
			}
			if got := s.state(); got != tt.want {
				t.Errorf("state %q, want %q", got, tt.want)
			}
			if got := s.reconnects.Load(); got != tt.reconnects {
				t.Errorf("reconnects %d, want %d", got, tt.reconnects)
			}
			if got := s.lastClose.Load(); got != tt.lastClose {
				t.Errorf("last close code %d, want %d", got, tt.lastClose)
			}
			if got := s.since.Load() != 0; got != tt.since {
				t.Errorf("connected since set: %v, want %v", got, tt.since)
			}
		})
	}
	var none *upstreamStats // counts nothing, and does not panic
	none.up(false)
	none.down()
	none.failed(errors.New("x"))
	none.lost(nil)
}
