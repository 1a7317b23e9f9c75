package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// The tests in this file run the relay behind real sockets on loopback:
// the frames an editor may send and how the relay answers them, pings and
// pongs, slow and silent peers.

func TestLocalFrameRules(t *testing.T) {
	tests := []struct {
		name   string
		frames [][]byte
		code   int
		reason string
	}{
		{"text frame", [][]byte{maskedFrame(0x81, []byte("hi"))}, closeUnsupported, "text frame"},
		{"too large", [][]byte{maskedFrame(0x82, make([]byte, 2<<10))}, closeTooBig, "larger than --max-message"},
		// A whole update in a first fragment: none of it may pass.
		{"fragmented", [][]byte{maskedFrame(0x02, update1), maskedFrame(0x80, []byte{0xff})}, closeUnsupported, "fragmented"},
		{"reserved opcode", [][]byte{maskedFrame(0x83, update1)}, closeProtocol, "reserved"},
		{"unmasked frame", [][]byte{{0x82, byte(len(update1))}, update1}, closeProtocol, "masking"},
		{"RSV bit", [][]byte{maskedFrame(0xc2, update1)}, closeProtocol, "RSV"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := startRelay(t, "--server", "ws://127.0.0.1:1/", "--max-message", "1KiB")
			bystander := join(t, r.addr, "doc")
			conn, br := rawJoin(t, r.addr, "doc")
			receiveSkipping(t, bystander, func(m []byte) bool { return m[0] == msgQueryAwareness })
			for _, f := range tt.frames {
				if _, err := conn.Write(f); err != nil {
					t.Fatal(err)
				}
			}
			if code := readCloseCode(t, br); code != tt.code {
				t.Errorf("close code %d, want %d", code, tt.code)
			}
			line := r.logs.waitFor(t, "editor disconnected")
			if !strings.Contains(line, tt.reason) {
				t.Errorf("log line %q lacks %q", line, tt.reason)
			}
			// Nothing of it reached the other editor, which still works.
			send(t, bystander, awareness)
			if got := receive(t, bystander); !bytes.Equal(got, awareness) {
				t.Errorf("bystander got % x, want its awareness", got)
			}
		})
	}
}

func TestMalformedMessageDroppedConnStaysOpen(t *testing.T) {
	r := startRelay(t, "--server", "ws://127.0.0.1:1/")
	bystander := join(t, r.addr, "doc")
	ws := join(t, r.addr, "doc")
	receiveSkipping(t, bystander, func(m []byte) bool { return m[0] == msgQueryAwareness })
	send(t, ws, []byte{msgSync, syncUpdate, 5, 1}) // declares 5 bytes, has 1
	send(t, ws, []byte{7})                         // unknown type
	send(t, ws, update1)
	// Only awareness noise from the joins may come before the good update.
	receiveSkipping(t, bystander, func(m []byte) bool { return bytes.Equal(m, update1) })
	r.logs.waitFor(t, "malformed messages dropped")
}

func TestPongAfterQuietPeriod(t *testing.T) {
	// Regression: a write deadline left over from the last write made the
	// library's pong fail once writeWait had passed, and every write after.
	setWriteWait(t, 100*time.Millisecond)
	r := startRelay(t, "--server", "ws://127.0.0.1:1/", "--ping-interval", "0", "--peer-timeout", "0")
	conn, br := rawJoin(t, r.addr, "doc")
	conn.Write(maskedFrame(0x82, awareness)) // its echo proves conn joined
	if op, _ := readFrame(t, br); op != websocket.BinaryFrame {
		t.Fatalf("got opcode %d, want the awareness echo", op)
	}
	join(t, r.addr, "doc") // the relay writes a query-awareness to conn
	if op, _ := readFrame(t, br); op != websocket.BinaryFrame {
		t.Fatalf("got opcode %d, want the query-awareness", op)
	}
	time.Sleep(3 * writeWait) // the behaviour under test: a quiet period
	conn.Write(maskedFrame(0x80|websocket.PingFrame, []byte("hi")))
	for {
		op, payload := readFrame(t, br) // the other editor's awareness may come first
		if op == websocket.PongFrame && string(payload) == "hi" {
			break
		}
		if op != websocket.BinaryFrame {
			t.Fatalf("got opcode %d %q, want a pong", op, payload)
		}
	}
	hello := awarenessMsg(42, 1, "{}")
	conn.Write(maskedFrame(0x82, hello))
	if op, payload := readFrame(t, br); op != websocket.BinaryFrame || !bytes.Equal(payload, hello) {
		t.Fatalf("got opcode %d % x, want the awareness echo", op, payload)
	}
}

// TestPongAnswersTheLatestPing checks the rule of RFC 6455 §5.5.3: with
// two pings waiting, the pong carries the newer one's payload.
func TestPongAnswersTheLatestPing(t *testing.T) {
	pongs := make(chan []byte, 1)
	answerLatest(pongs, []byte("older"))
	answerLatest(pongs, []byte("newer"))
	if got := <-pongs; string(got) != "newer" {
		t.Errorf("pong for %q, want the latest ping, %q", got, "newer")
	}
	select {
	case got := <-pongs:
		t.Errorf("a second pong %q is waiting", got)
	default:
	}
}

func TestPingFloodFromAPeerThatDoesNotRead(t *testing.T) {
	// Pongs are written by the writer goroutine with a deadline: a peer
	// that pings without reading is closed once a write times out, rather
	// than holding a reader blocked in a pong write for ever.
	setWriteWait(t, 200*time.Millisecond)
	r := startRelay(t, "--server", "ws://127.0.0.1:1/", "--ping-interval", "0", "--peer-timeout", "0")
	conn, _ := rawJoin(t, r.addr, "doc")
	conn.SetDeadline(time.Time{})
	ping := maskedFrame(0x80|websocket.PingFrame, bytes.Repeat([]byte{'p'}, maxControlPayload))
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := conn.Write(ping); err != nil {
				return
			}
		}
	}()
	line := r.logs.waitFor(t, "editor disconnected")
	t.Logf("%s", line)
}

func TestSilentEditorClosedAfterPeerTimeout(t *testing.T) {
	r := startRelay(t, "--server", "ws://127.0.0.1:1/", "--ping-interval", "100ms", "--peer-timeout", "500ms")
	bystander := join(t, r.addr, "doc")
	// The bystander reads all along: x/net answers pings only while reading.
	heard := make(chan []byte, 100)
	go func() {
		for {
			var m []byte
			if websocket.Message.Receive(bystander, &m) != nil {
				close(heard)
				return
			}
			heard <- m
		}
	}()
	conn, br := rawJoin(t, r.addr, "doc") // answers no ping: a peer gone without a FIN
	conn.Write(maskedFrame(0x82, awarenessMsg(77, 3, "{}")))
	pings := 0
	for {
		op, payload := readFrame(t, br)
		if op == websocket.PingFrame {
			pings++
		}
		if op == websocket.CloseFrame {
			if pc, err := parseClose(payload); err != nil || pc.code != closePeerTimeout {
				t.Errorf("closed with % x, want code %d (peer timeout)", payload, closePeerTimeout)
			}
			break
		}
	}
	if pings < 2 {
		t.Errorf("%d pings before the close, want a few", pings)
	}
	line := r.logs.waitFor(t, "editor disconnected")
	if !strings.Contains(line, "timeout") {
		t.Errorf("closed for another reason than the peer timeout: %s", line)
	}
	// Its client is gone for the others at once.
	deadline := time.After(testTimeout)
	for {
		select {
		case m, ok := <-heard:
			if !ok {
				t.Fatal("the bystander was closed too")
			}
			if bytes.Equal(m, awarenessMsg(77, 4, "null")) {
				return
			}
		case <-deadline:
			t.Fatal("the bystander never heard that client 77 is gone")
		}
	}
}

func TestSlowSocketClosedWithoutStallingOthers(t *testing.T) {
	// The slow editor's writer is blocked from the first full socket buffer
	// until the hub finds its queue full; under -race on a busy machine
	// that can take longer than the usual write deadline.
	setWriteWait(t, time.Minute)
	r := startRelay(t, "--server", "ws://127.0.0.1:1/") // upstream stays down
	sender := join(t, r.addr, "doc")
	reader := join(t, r.addr, "doc")
	slow, slowBuf := rawJoin(t, r.addr, "doc") // never reads until the end
	slow.SetDeadline(time.Time{})

	// Enough data to fill slow's socket buffers and its send queue, sent
	// in windows that the healthy reader keeps up with.
	const n, window = 640, 32
	payload := bytes.Repeat([]byte{0xab}, 64<<10)
	msg := append(appendVaruint([]byte{msgSync, syncUpdate}, uint64(len(payload))), payload...)
	for i := 0; i < n; i += window {
		for range window {
			send(t, sender, msg)
		}
		for j := range window {
			if got := receiveSkipping(t, reader, func(m []byte) bool { return m[0] == msgSync }); !bytes.Equal(got, msg) {
				t.Fatalf("message %d: got %d bytes", i+j, len(got))
			}
		}
	}
	r.logs.waitFor(t, "slow editor closed")
	// The slow editor gets what was queued for it, then "try again later".
	slow.SetDeadline(time.Now().Add(testTimeout))
	if code := readCloseCode(t, slowBuf); code != closeTryAgain {
		t.Errorf("slow editor closed with %d, want %d", code, closeTryAgain)
	}
}

// TestLiveEditorOnASlowLinkIsNotCutOff sends an editor behind a slow
// downlink a message that takes it several peer timeouts to receive: its
// pongs wait behind that message, yet it stays connected and gets the
// next message too. The same editor once its link takes nothing more is
// closed as dead.
func TestLiveEditorOnASlowLinkIsNotCutOff(t *testing.T) {
	r := startRelay(t, "--server", "ws://127.0.0.1:1/", "--ping-interval", "200ms", "--peer-timeout", "1s")
	link := startSlowLink(t, r.addr, 96<<10)
	slow := join(t, link.ln.Addr().String(), "doc")
	fast := join(t, r.addr, "doc")
	go io.Copy(io.Discard, fast)                       // x/net answers pings only while reading
	big := updateMsg(bytes.Repeat([]byte{7}, 256<<10)) // 2.7 s over the link
	send(t, fast, big)
	receiveSkipping(t, slow, func(m []byte) bool { return bytes.Equal(m, big) })
	small := updateMsg([]byte{1, 2, 3})
	send(t, fast, small)
	receiveSkipping(t, slow, func(m []byte) bool { return bytes.Equal(m, small) })
	if strings.Contains(r.logs.String(), "editor disconnected") {
		t.Fatalf("an editor was closed: %s", r.logs.String())
	}

	close(link.frozen)
	send(t, fast, big)
	line := r.logs.waitFor(t, "editor disconnected")
	if !strings.Contains(line, "code=4408") {
		t.Errorf("a dead peer closed for another reason than the peer timeout: %s", line)
	}
}

// slowLink is a TCP proxy to target that passes what the relay sends at
// rate bytes per second, as a slow downlink does, or not at all once
// frozen; the other way it passes everything at once.
type slowLink struct {
	ln     net.Listener
	target string
	rate   int
	frozen chan struct{} // closed: nothing more reaches the client
	done   chan struct{} // closed at the test's end
}

// startSlowLink listens on a loopback port; the test's end closes it.
func startSlowLink(t *testing.T, target string, rate int) *slowLink {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &slowLink{ln: ln, target: target, rate: rate, frozen: make(chan struct{}), done: make(chan struct{})}
	t.Cleanup(func() {
		close(p.done)
		ln.Close()
	})
	go p.accept(t)
	return p
}

// accept proxies every connection until the listener closes.
func (p *slowLink) accept(t *testing.T) {
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		relay, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			return
		}
		t.Cleanup(func() { client.Close(); relay.Close() })
		go io.Copy(relay, client)
		go p.pace(client, relay)
	}
}

// pace copies src to dst at p.rate in 4 KiB steps. The waits shape a
// link's speed; they synchronise nothing.
func (p *slowLink) pace(dst, src net.Conn) {
	buf := make([]byte, 4<<10)
	start, sent := time.Now(), 0
	for {
		n, err := src.Read(buf)
		if err != nil {
			return
		}
		select {
		case <-p.frozen:
			<-p.done // takes nothing more, like a vanished peer
			return
		default:
		}
		if _, err := dst.Write(buf[:n]); err != nil {
			return
		}
		sent += n
		time.Sleep(time.Until(start.Add(time.Duration(sent) * time.Second / time.Duration(p.rate))))
	}
}

// chunkConn is an editor's socket for frameReader tests: its reads return
// data at most chunk bytes at a time, then one deadline error, as when a
// ping falls due on a quiet socket, then EOF. rooms records how many
// bytes each read was given room for.
type chunkConn struct {
	net.Conn // nil: only Read and SetReadDeadline are called
	data     []byte
	chunk    int
	pinged   bool // the deadline error has been returned
	rooms    []int
}

// Read returns the next chunk of data.
func (c *chunkConn) Read(p []byte) (int, error) {
	c.rooms = append(c.rooms, len(p))
	if len(c.data) == 0 {
		if !c.pinged {
			c.pinged = true
			return 0, os.ErrDeadlineExceeded
		}
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), c.chunk)], c.data)
	c.data = c.data[n:]
	return n, nil
}

// SetReadDeadline does nothing: chunkConn's deadline error comes when its
// data ends.
func (c *chunkConn) SetReadDeadline(time.Time) error { return nil }

// TestEditorFramesAcrossReads reads an editor's frames of every length
// encoding, masked with different keys, as the socket hands them over in
// pieces of every size, with some already read during the handshake. Each
// message comes out whole and unmasked, a ping between them goes to the
// writer, and once the socket is quiet the reader waits with its small
// buffer, the pooled one given back.
func TestEditorFramesAcrossReads(t *testing.T) {
	var wire []byte
	var want [][]byte
	for i, size := range []int{0, 1, 13, 125, 126, 4000, 4096, 5000, 70000} {
		msg := make([]byte, size)
		for j := range msg {
			msg[j] = byte(i + j)
		}
		wire = append(wire, clientFrame(opBinary, msg, [4]byte{byte(i), 0x5a, 0xa5, byte(size)})...)
		want = append(want, msg)
		if i == 3 {
			wire = append(wire, clientFrame(opPing, []byte("hi"), [4]byte{1, 2, 3, 4})...)
		}
	}
	for _, chunk := range []int{1, 3, 14, 16, 100, readBuffer, 1 << 20} {
		for _, early := range []int{0, 1, 7, 300} {
			t.Run(fmt.Sprintf("reads of %d, %d early", chunk, early), func(t *testing.T) {
				nc := &chunkConn{data: wire[early:], chunk: chunk}
				p := makePeer(discard, keepalive{interval: time.Hour})
				p.nc, p.raw = nc, nc
				p.live = newLiveness(nc, 0, time.Hour)
				p.live.pingAt.Store(1) // due, for the deadline error at the end
				in := wireReader{buf: slices.Clone(wire[:early]), w: early, full: early > 0}
				r := frameReader{p: &p, in: &in, max: 1 << 20}
				for i, w := range want {
					if got, err := r.next(); err != nil || !bytes.Equal(got, w) {
						t.Fatalf("message %d: got %d bytes, %v; want %d bytes", i, len(got), err, len(w))
					}
				}
				if _, err := r.next(); err != io.EOF {
					t.Fatalf("after the last message: %v, want EOF", err)
				}
				select {
				case got := <-p.pongs:
					if string(got) != "hi" {
						t.Errorf("pong for %q, want %q", got, "hi")
					}
				default:
					t.Error("the ping was not handed to the writer")
				}
				if !p.live.pingWanted.Load() {
					t.Error("the deadline passed without a ping asked of the writer")
				}
				if last := nc.rooms[len(nc.rooms)-1]; last > idleRead || in.pooled != nil {
					t.Errorf("waited on a quiet socket with room for %d bytes (pooled buffer held: %v), want at most %d", last, in.pooled != nil, idleRead)
				}
			})
		}
	}
}

// TestFramesSentWithTheHandshake sends an awareness message in the same
// write as the upgrade request: the bytes that net/http read with the
// request reach the editor's reader, and the message comes back as its
// echo.
func TestFramesSentWithTheHandshake(t *testing.T) {
	r := startRelay(t, "--server", "ws://127.0.0.1:1/")
	hello := awarenessMsg(31, 1, "{}")
	_, br := rawJoinSending(t, r.addr, "doc", clientFrame(opBinary, hello, [4]byte{9, 8, 7, 6}))
	for {
		op, payload := readFrame(t, br)
		if op == opBinary && bytes.Equal(payload, hello) {
			return
		}
		if op != opBinary || !bytes.Equal(payload, emptyStep1) {
			t.Fatalf("got opcode %d % x, want the step 1 and the awareness echo", op, payload)
		}
	}
}

// TestQuietEditorAnsweringPingsStaysOpen keeps an editor silent for many
// peer timeouts but for its pongs: the pings that the read deadline brings
// keep it alive, and it still gets messages afterwards.
func TestQuietEditorAnsweringPingsStaysOpen(t *testing.T) {
	r := startRelay(t, "--server", "ws://127.0.0.1:1/", "--ping-interval", "50ms", "--peer-timeout", "200ms")
	conn, br := rawJoin(t, r.addr, "doc")
	for pings := 0; pings < 12; { // 600 ms: three peer timeouts
		switch op, payload := readFrame(t, br); op {
		case opPing:
			pings++
			conn.Write(clientFrame(opPong, payload, [4]byte{1, 2, 3, 4}))
		case opClose:
			t.Fatalf("closed after %d pings: % x", pings, payload)
		}
	}
	hello := awarenessMsg(5, 1, "{}")
	conn.Write(clientFrame(opBinary, hello, [4]byte{4, 3, 2, 1}))
	for {
		op, payload := readFrame(t, br)
		if op == opBinary && bytes.Equal(payload, hello) {
			return
		}
		if op != opPing {
			t.Fatalf("got opcode %d % x, want the awareness echo", op, payload)
		}
		conn.Write(clientFrame(opPong, payload, [4]byte{1, 2, 3, 4}))
	}
}

// TestRefusedHandshakeGivesBackItsRoom sends upgrades that x/net/websocket
// refuses: each is answered with 400 and closed, and the admission it took
// is given back, so that a good editor still gets the one place the
// document has.
func TestRefusedHandshakeGivesBackItsRoom(t *testing.T) {
	r := startRelay(t, "--server", "ws://127.0.0.1:1/", "--max-per-document", "1")
	tests := []struct {
		name, headers string
	}{
		{"old protocol version", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n"},
		{"no key", "Sec-WebSocket-Version: 13\r\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn, err := net.DialTimeout("tcp", r.addr, testTimeout)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(testTimeout))
			fmt.Fprintf(conn, "GET /doc HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n%s\r\n", r.addr, tt.headers)
			answer, err := io.ReadAll(conn) // to the close
			if err != nil || !bytes.HasPrefix(answer, []byte("HTTP/1.1 400 ")) {
				t.Fatalf("got %q, %v; want a 400 and the close", answer, err)
			}
		})
	}
	join(t, r.addr, "doc")
}

// TestIdleEditorsHoldLittle opens idle editors and checks what the design
// promises them: one goroutine each (the reader; no writer once their
// joins' messages are out), and at most the 12 KiB of issue 12 of heap
// and stacks in this process each, the test's own client sockets
// included. It was 36 KiB with a writer goroutine, a send channel of 256
// slots and net/http's buffers per editor.
func TestIdleEditorsHoldLittle(t *testing.T) {
	const editors = 1000
	r := startRelay(t, "--server", "ws://127.0.0.1:1/", "--max-per-document", "1000")
	r.logs.waitFor(t, "upstream unavailable") // the relay's own goroutines have started
	baseline := runtime.NumGoroutine()
	before := memInUse()
	for i := range editors {
		conn, br := rawJoin(t, r.addr, fmt.Sprintf("doc-%d", i%10))
		conn.SetDeadline(time.Time{})
		if op, payload := readFrame(t, br); op != opBinary || !bytes.Equal(payload, emptyStep1) {
			t.Fatalf("editor %d got opcode %d % x first, want the step 1", i, op, payload)
		}
	}
	waitForGoroutines(t, baseline+editors)
	if raceEnabled {
		return // the race detector's shadow memory and larger stacks
	}
	per := (int64(memInUse()) - int64(before)) / editors
	if per > 12<<10 {
		t.Errorf("%d bytes of heap and stacks per idle editor, want at most %d", per, 12<<10)
	}
}

// TestReadPayload reads payloads of sizes around the exact-read bound,
// whole and cut short: the bytes come back exactly, with no spare
// capacity, and a short one is io.ErrUnexpectedEOF.
func TestReadPayload(t *testing.T) {
	for _, size := range []int{0, 1, exactRead - 1, exactRead, exactRead + 1, exactRead + 24, 2*exactRead + 7, 5 * exactRead} {
		want := make([]byte, size)
		for i := range want {
			want[i] = byte(i * 7)
		}
		got, err := readPayload(bytes.NewReader(want), size)
		if err != nil || !bytes.Equal(got, want) || cap(got) != size {
			t.Errorf("size %d: %d bytes (cap %d), %v; want them all, no spare capacity", size, len(got), cap(got), err)
		}
		if size == 0 {
			continue
		}
		got, err = readPayload(bytes.NewReader(want[:size-1]), size)
		if !errors.Is(err, io.ErrUnexpectedEOF) || !bytes.Equal(got, want[:size-1]) {
			t.Errorf("size %d cut by one: %d bytes, %v; want %d and io.ErrUnexpectedEOF", size, len(got), err, size-1)
		}
	}
}
