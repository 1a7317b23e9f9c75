package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// Helpers shared by more than one test file: test messages, logs, an
// in-process relay and the clients that talk to it, raw frames.

// Test messages: two distinct updates, a sync step 1 that is not the
// relay's own empty one, and an awareness message with no clients.
var (
	update1   = []byte{msgSync, syncUpdate, 1, 0xa1}
	update2   = []byte{msgSync, syncUpdate, 1, 0xa2}
	step1     = []byte{msgSync, syncStep1, 1, 0}
	awareness = []byte{msgAwareness, 1, 0}
)

// testTimeout bounds every wait in these tests; a wait that times out fails.
const testTimeout = 10 * time.Second

// discard is a logger for tests that do not look at logs.
var discard = slog.New(slog.DiscardHandler)

// unhex turns "02 00 05" into bytes; it fails the test on bad input.
func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

// awarenessMsg builds an awareness message from (client, clock, state) triples.
func awarenessMsg(entries ...any) []byte {
	var update []byte
	update = appendVaruint(update, uint64(len(entries)/3))
	for i := 0; i < len(entries); i += 3 {
		update = appendVaruint(update, uint64(entries[i].(int)))
		update = appendVaruint(update, uint64(entries[i+1].(int)))
		state := entries[i+2].(string)
		update = appendVaruint(update, uint64(len(state)))
		update = append(update, state...)
	}
	return append(appendVaruint([]byte{msgAwareness}, uint64(len(update))), update...)
}

// logBuffer collects log output from several goroutines and passes every
// line on to lines, so that tests can wait for an event without polling.
type logBuffer struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	lines chan string
}

// newLogBuffer returns an empty buffer whose line channel has room for
// more lines than any test waits through.
func newLogBuffer() *logBuffer { return &logBuffer{lines: make(chan string, 10000)} }

// Write keeps p and hands it to a waiter, if one can still take lines.
func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	select {
	case b.lines <- string(p):
	default: // nobody waits for this many lines
	}
	return b.buf.Write(p)
}

// waitFor returns the next log line that contains substr.
func (b *logBuffer) waitFor(t testing.TB, substr string) string {
	t.Helper()
	deadline := time.After(testTimeout)
	for {
		select {
		case line := <-b.lines:
			if strings.Contains(line, substr) {
				return line
			}
		case <-deadline:
			t.Fatalf("timed out waiting for a log line with %q", substr)
			return ""
		}
	}
}

// String returns everything logged so far.
func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// testRelay is a relay started in-process on 127.0.0.1 with a free port.
type testRelay struct {
	addr   string
	logs   *logBuffer
	status chan int // the exit status, once run returns
	stop   context.CancelFunc
}

// startRelay runs the relay with args (HOST and PORT are added) until the
// test ends, and fails the test if it does not stop in time.
func startRelay(t testing.TB, args ...string) *testRelay {
	t.Helper()
	return startRelayAt(t, slog.LevelDebug, args...)
}

// startRelayAt is startRelay with the log at level, for tests of what a
// user sees without -v.
func startRelayAt(t testing.TB, level slog.Level, args ...string) *testRelay {
	t.Helper()
	cfg, err := parseArgs(append(args, "127.0.0.1", "0"), func(string) string { return "" })
	if err != nil {
		t.Fatalf("parseArgs: %v", err)
	}
	logs := newLogBuffer()
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: level}))
	s, err := listen(cfg, log)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &testRelay{addr: s.addr(), logs: logs, status: make(chan int, 1), stop: cancel}
	go func() { r.status <- s.run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.status:
		case <-time.After(testTimeout):
			t.Errorf("relay did not stop in time")
		}
		if t.Failed() {
			t.Logf("relay log:\n%s", logs.String())
		}
	})
	return r
}

// waitExit returns the relay's exit status.
func (r *testRelay) waitExit(t testing.TB) int {
	t.Helper()
	select {
	case code := <-r.status:
		r.status <- code // for the cleanup
		return code
	case <-time.After(testTimeout):
		t.Fatal("relay did not exit")
		return -1
	}
}

// dialLocal opens an editor connection to doc like a native Yjs client
// (binary frames, no Origin header is needed but x/net sends one).
func dialLocal(t testing.TB, addr, doc string) *websocket.Conn {
	t.Helper()
	cfg, err := websocket.NewConfig("ws://"+addr+"/"+doc, "http://localhost/")
	if err != nil {
		t.Fatal(err)
	}
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		t.Fatalf("dial %s: %v", doc, err)
	}
	ws.PayloadType = websocket.BinaryFrame
	t.Cleanup(func() { ws.Close() })
	return ws
}

// send writes one binary message.
func send(t testing.TB, ws *websocket.Conn, msg []byte) {
	t.Helper()
	if err := websocket.Message.Send(ws, msg); err != nil {
		t.Fatalf("send: %v", err)
	}
}

// receive reads one message within testTimeout.
func receive(t testing.TB, ws *websocket.Conn) []byte {
	t.Helper()
	ws.SetReadDeadline(time.Now().Add(testTimeout))
	var msg []byte
	if err := websocket.Message.Receive(ws, &msg); err != nil {
		t.Fatalf("receive: %v", err)
	}
	return msg
}

// join dials doc and returns once the hub has the editor registered: its
// awareness message has come back to it.
func join(t testing.TB, addr, doc string) *websocket.Conn {
	t.Helper()
	ws := dialLocal(t, addr, doc)
	hello := unhex(t, "01 01 00")
	send(t, ws, hello)
	receiveSkipping(t, ws, func(msg []byte) bool { return bytes.Equal(msg, hello) })
	return ws
}

// receiveSkipping reads until a message satisfies want and returns it,
// skipping what the relay may send in between: awareness, query-awareness
// and sync step 1 from other editors.
func receiveSkipping(t testing.TB, ws *websocket.Conn, want func([]byte) bool) []byte {
	t.Helper()
	for {
		msg := receive(t, ws)
		if want(msg) {
			return msg
		}
		noise := len(msg) > 0 && (msg[0] == msgAwareness || msg[0] == msgQueryAwareness) ||
			bytes.HasPrefix(msg, []byte{msgSync, syncStep1})
		if !noise {
			t.Fatalf("unexpected message % x", msg)
		}
	}
}

// hostOf is the host:port of a URI, for tests.
func hostOf(t *testing.T, raw string) string {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return u.Host
}

// waitForGoroutines waits until no more than n goroutines run. No event
// tells that a goroutine has ended: it polls, within testTimeout.
func waitForGoroutines(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for runtime.NumGoroutine() > n {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, want at most %d:\n%s", runtime.NumGoroutine(), n, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// heapInUse returns the heap in use after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// rawJoin upgrades a plain TCP connection to doc, so that the test can
// write frames that x/net/websocket would never send.
func rawJoin(t *testing.T, addr, doc string) (net.Conn, *bufio.Reader) {
	t.Helper()
	return rawJoinSending(t, addr, doc, nil)
}

// rawJoinSending is rawJoin whose client sends early, in the same write
// as its request, before it has the answer: frames a client may send
// without waiting. The reader it returns has read the answer and may
// hold more.
func rawJoinSending(t *testing.T, addr, doc string, early []byte) (net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, testTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(testTimeout))
	req := fmt.Sprintf("GET /%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", doc, addr)
	if _, err := conn.Write(append([]byte(req), early...)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v, %v", resp, err)
	}
	return conn, br
}

// maskedFrame builds a client frame with the zero masking key, so that
// the payload goes out as it is. first is the FIN bit and opcode byte.
func maskedFrame(first byte, payload []byte) []byte {
	f := []byte{first}
	switch n := len(payload); {
	case n < 126:
		f = append(f, 0x80|byte(n))
	default:
		f = append(f, 0x80|126, byte(n>>8), byte(n))
	}
	f = append(f, 0, 0, 0, 0)
	return append(f, payload...)
}

// readFrame reads one frame, unmasking a client's.
func readFrame(t *testing.T, br *bufio.Reader) (opcode byte, payload []byte) {
	t.Helper()
	var hdr [2]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		t.Fatalf("no frame: %v", err)
	}
	size := uint64(hdr[1] & 0x7f)
	switch size {
	case 126:
		var ext [2]byte
		io.ReadFull(br, ext[:])
		size = uint64(binary.BigEndian.Uint16(ext[:]))
	case 127:
		var ext [8]byte
		io.ReadFull(br, ext[:])
		size = binary.BigEndian.Uint64(ext[:])
	}
	var mask [4]byte
	if hdr[1]&0x80 != 0 { // a client's frame
		io.ReadFull(br, mask[:])
	}
	payload = make([]byte, size)
	if _, err := io.ReadFull(br, payload); err != nil {
		t.Fatalf("frame payload: %v", err)
	}
	for i := range payload {
		payload[i] ^= mask[i%4]
	}
	return hdr[0] & 0x0f, payload
}

// readCloseCode reads server frames until a close frame and returns its
// code; then it checks that the server sends nothing after it.
func readCloseCode(t *testing.T, br *bufio.Reader) int {
	t.Helper()
	for {
		op, payload := readFrame(t, br)
		if op != websocket.CloseFrame || len(payload) < 2 {
			continue
		}
		if extra, err := br.ReadByte(); err == nil {
			t.Errorf("byte %#x after the close frame, want the end", extra)
		}
		return int(binary.BigEndian.Uint16(payload))
	}
}

// setWriteWait sets writeWait to d for one test.
func setWriteWait(t *testing.T, d time.Duration) {
	saved := writeWait
	writeWait = d
	t.Cleanup(func() { writeWait = saved })
}

// updateMsg wraps update in a sync update message (00 02 bytes).
func updateMsg(update []byte) []byte {
	return append(appendVaruint([]byte{msgSync, syncUpdate}, uint64(len(update))), update...)
}

// clientFrame builds a final client frame of opcode with payload, masked
// with key (RFC 6455 §5.3), in any length encoding.
func clientFrame(opcode byte, payload []byte, key [4]byte) []byte {
	f := appendServerHeader(nil, opcode, len(payload))
	f[1] |= 0x80
	f = append(f, key[:]...)
	start := len(f)
	f = append(f, payload...)
	maskBytes(key, 0, f[start:])
	return f
}

// memInUse returns the heap and the goroutine stacks in use, in bytes,
// after two collections: the second frees what sync.Pools kept through
// the first.
func memInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse
}
