package main

import (
	"bytes"
	"io"
	"net"
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
