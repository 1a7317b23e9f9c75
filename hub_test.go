package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// The hub is tested in memory through a hubHarness: conns are bare send
// queues without a socket, the upstream is a bare link queue, and the
// harness plays the readers, handlers and upstream around them. The
// harness is the only test code that knows the hub's channels and
// fields: when they change, only it changes.

// hubHarness runs one hub for a test and plays its surroundings: the HTTP
// handlers that admit, join and release editors, the editors' readers that
// post frames and leave, and the upstream that attaches, delivers frames
// and detaches.
type hubHarness struct {
	t      testing.TB
	hub    *hub
	cancel context.CancelFunc
	// released marks the conns whose handler has returned: each releases
	// its admission once, as serve does.
	released map[*conn]bool
}

// startHub runs a hub that logs to log (nil: nowhere), set up by configure
// (nil: the defaults) before it starts, until the test ends.
func startHub(t testing.TB, log *slog.Logger, configure func(*hub)) *hubHarness {
	t.Helper()
	if log == nil {
		log = discard
	}
	hb := newHub(connQueue, defaultMaxMessage, keepalive{}, limits{}, log)
	if configure != nil {
		configure(hb)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go hb.run(ctx)
	h := &hubHarness{t: t, hub: hb, cancel: cancel, released: make(map[*conn]bool)}
	t.Cleanup(h.stop)
	return h
}

// withUpstreamMax sets --upstream-max-message, for startHub.
func withUpstreamMax(n int) func(*hub) { return func(hb *hub) { hb.upstreamMax = n } }

// withStopWait bounds the hub's part of a stop, for startHub.
func withStopWait(d time.Duration) func(*hub) { return func(hb *hub) { hb.stopWait = d } }

// withSweep makes every timer of the gone table's sweep fire when the
// test sends on sweep, for startHub.
func withSweep(sweep chan time.Time) func(*hub) {
	return func(hb *hub) { hb.after = func(time.Duration) <-chan time.Time { return sweep } }
}

// join plays an editor's handler: admitted, then joined to doc with a
// send queue of queue frames. It checks what every newcomer gets first,
// the empty step 1 that asks for its document. At the end of the test the
// editor leaves, as a real one always does.
func (h *hubHarness) join(doc string, queue int) *conn {
	h.t.Helper()
	if err := h.hub.admit(doc); err != nil {
		h.t.Fatalf("admit: %v", err)
	}
	c := testConn(doc, queue)
	h.hub.join <- c
	h.t.Cleanup(func() { h.leave(c) })
	h.expect(c, emptyStep1)
	return c
}

// testConn makes an editor's conn without a socket, whose send queue
// takes up to queue frames. The test plays its writer (next, queued): the
// conn's state says a writer runs, so the hub never starts one.
func testConn(doc string, queue int) *conn {
	first := &segment{ch: make(chan []byte, min(minSegment, queue))}
	c := &conn{peer: peer{log: discard}, doc: doc, remote: "mem", limit: queue, tail: first, head: first}
	c.writer.Store(writerRunning)
	return c
}

// takeQueued waits for the next frame queued for c, or until timeout (nil:
// no wait at all), and follows the queue from segment to segment as c's
// writer does; ended is true at the queue's end. The caller plays c's
// writer.
func takeQueued(c *conn, timeout <-chan time.Time) (msg []byte, ended, timedOut bool) {
	for {
		msg, got := c.take()
		switch {
		case got == queueFrame:
			return msg, false, false
		case got == queueEnded || c.head == nil:
			return nil, true, false
		case timeout == nil:
			return nil, false, true
		}
		select { // wait for the segment to hold something, or to close
		case msg, ok := <-c.head.ch:
			if ok {
				c.queued.Add(-1)
				return msg, false, false
			}
			if c.head = c.head.next; c.head == nil {
				return nil, true, false
			}
		case <-timeout:
			return nil, false, true
		}
	}
}

// twoEditors joins two editors to doc and consumes the query-awareness
// that the second one's arrival sends the first.
func (h *hubHarness) twoEditors(doc string) (a, b *conn) {
	h.t.Helper()
	a = h.join(doc, connQueue)
	b = h.join(doc, connQueue)
	h.expect(a, queryAwareness)
	return a, b
}

// stuffed joins an editor whose queue of one is already full, as a slow
// editor's is.
func (h *hubHarness) stuffed(doc string) *conn {
	h.t.Helper()
	c := h.join(doc, 1)
	c.queued.Add(1) // a frame queued that the writer has not taken
	return c
}

// post plays c's reader: it checks msg as the reader does (its kind, and
// its entries if it is awareness) and hands it to the hub.
func (h *hubHarness) post(c *conn, msg []byte) {
	h.t.Helper()
	h.hub.fromEditors <- h.frame(c.doc, msg, c)
}

// postFrame plays a reader that has decoded f already: for benchmarks of
// the hub alone.
func (h *hubHarness) postFrame(f frame) { h.hub.fromEditors <- f }

// fromUpstream plays the upstream reader: msg arrives for doc.
func (h *hubHarness) fromUpstream(doc string, msg []byte) {
	h.t.Helper()
	h.hub.fromServer <- h.frame(doc, msg, nil)
}

// frame decodes msg as the readers do.
func (h *hubHarness) frame(doc string, msg []byte, from *conn) frame {
	h.t.Helper()
	kind, err := messageKind(msg)
	if err != nil {
		h.t.Fatalf("test message % x: %v", msg, err)
	}
	f := frame{doc: doc, data: msg, kind: kind, from: from}
	if kind == msgAwareness {
		if f.aware, err = readAwareness(msg, nil); err != nil {
			h.t.Fatalf("test message % x: %v", msg, err)
		}
	}
	return f
}

// leave plays the end of c's reader (a normal close) and of its handler.
func (h *hubHarness) leave(c *conn) { h.leaveWith(c, closeNormal) }

// leaveWith plays the end of c's reader, which answers with code, and of
// its handler. The hub ignores a reader that ends after the hub closed
// its conn; a handler releases its admission once.
func (h *hubHarness) leaveWith(c *conn, code int) {
	select {
	case h.hub.leave <- leaving{c, code}:
	case <-h.hub.quit:
		return
	}
	if !h.released[c] {
		h.released[c] = true
		h.hub.release(c.doc)
	}
}

// attach plays a new upstream connection whose send queue takes queue
// frames.
func (h *hubHarness) attach(queue int) *upstreamLink {
	l := &upstreamLink{send: make(chan frame, queue)}
	h.hub.upstream <- upstreamEvent{link: l, attach: true}
	return l
}

// detach plays the end of l's connection.
func (h *hubHarness) detach(l *upstreamLink) { h.hub.upstream <- upstreamEvent{link: l} }

// barrier returns once the hub has handled everything sent to it before,
// frames still waiting in its inboxes included: an admission is a round
// trip through its loop, and the inboxes are empty once the loop has
// taken their last frame. During a stop the admission is refused, which
// is the same round trip.
func (h *hubHarness) barrier() {
	h.t.Helper()
	for {
		pending := len(h.hub.fromEditors) > 0 || len(h.hub.fromServer) > 0
		switch err := h.hub.admit("barrier"); err {
		case nil:
			h.hub.release("barrier")
		case errStopping:
		default:
			h.t.Fatalf("barrier: %v", err)
		}
		if !pending {
			return
		}
	}
}

// beginStop cancels the hub's context: it starts its stop, which waits
// for the editors' handlers to return.
func (h *hubHarness) beginStop() { h.cancel() }

// stop stops the hub and waits until it has returned.
func (h *hubHarness) stop() {
	h.cancel()
	<-h.hub.quit
}

// goneAfterStop stops the hub and returns the size of its table of gone
// clients and whether the table still holds memory: once the hub has
// returned, its fields are the test's.
func (h *hubHarness) goneAfterStop() (n int, holdsMemory bool) {
	h.stop()
	return h.hub.gone.len(), h.hub.gone.entries != nil || h.hub.gone.order != nil
}

// sendBudget is the byte budget of an editor's send queue.
func (h *hubHarness) sendBudget() int64 { return h.hub.connBytes }

// drain takes n messages from c's queue, waiting for each. It fails
// nothing, so that it may run on a goroutine of its own.
func (h *hubHarness) drain(c *conn, n int) {
	never := make(chan time.Time)
	for range n {
		takeQueued(c, never)
	}
}

// drainUp takes n messages from l's queue, as drain does.
func (h *hubHarness) drainUp(l *upstreamLink, n int) {
	for range n {
		<-l.send
	}
}

// next returns the next message queued for c.
func (h *hubHarness) next(c *conn) []byte {
	h.t.Helper()
	msg, ended, timedOut := takeQueued(c, time.After(testTimeout))
	switch {
	case ended:
		h.t.Fatalf("conn on %s was closed (code %d)", c.doc, c.closeCode)
	case timedOut:
		h.t.Fatalf("nothing queued for conn on %s", c.doc)
	}
	return msg
}

// expect fails unless c's next message is want.
func (h *hubHarness) expect(c *conn, want []byte) {
	h.t.Helper()
	if got := h.next(c); !bytes.Equal(got, want) {
		h.t.Fatalf("conn on %s got % x, want % x", c.doc, got, want)
	}
}

// queued takes every message queued for c now, without waiting.
func (h *hubHarness) queued(c *conn) [][]byte {
	var msgs [][]byte
	for {
		msg, ended, timedOut := takeQueued(c, nil)
		if ended || timedOut {
			return msgs
		}
		msgs = append(msgs, msg)
	}
}

// expectEmpty fails if anything is queued for c.
func (h *hubHarness) expectEmpty(c *conn) {
	h.t.Helper()
	if msgs := h.queued(c); len(msgs) > 0 {
		h.t.Fatalf("conn on %s got % x, want nothing", c.doc, msgs)
	}
}

// expectClosed fails unless c's queue is closed, after draining it, with
// code.
func (h *hubHarness) expectClosed(c *conn, code int) {
	h.t.Helper()
	timeout := time.After(testTimeout)
	for {
		_, ended, timedOut := takeQueued(c, timeout)
		switch {
		case timedOut:
			h.t.Fatal("conn was not closed")
		case !ended:
			continue
		case c.closeCode != code:
			h.t.Fatalf("closed with %d, want %d", c.closeCode, code)
		}
		return
	}
}

// upMsg is one message queued for the upstream and its document.
type upMsg struct {
	doc  string
	data []byte
}

// nextUp returns the next message queued on l; open is false once the
// hub has closed l and its queue is empty.
func (h *hubHarness) nextUp(l *upstreamLink) (m upMsg, open bool) {
	h.t.Helper()
	deadline := time.After(testTimeout)
	for {
		select {
		case f, ok := <-l.send:
			if ok && isMarker(f) {
				continue // for modes with a connection per document
			}
			return upMsg{f.doc, f.data}, ok
		case <-deadline:
			h.t.Fatal("nothing queued for the upstream")
			return upMsg{}, false
		}
	}
}

// expectUpstream reads l's queue until it finds want.
func (h *hubHarness) expectUpstream(l *upstreamLink, want []byte) {
	h.t.Helper()
	deadline := time.After(testTimeout)
	for {
		select {
		case f := <-l.send:
			if bytes.Equal(f.data, want) {
				return
			}
		case <-deadline:
			h.t.Fatalf("upstream never got % x", want)
		}
	}
}

// queuedUp takes every message queued on l now, without waiting.
func (h *hubHarness) queuedUp(l *upstreamLink) []upMsg {
	var msgs []upMsg
	for {
		select {
		case f, ok := <-l.send:
			if !ok {
				return msgs
			}
			if !isMarker(f) {
				msgs = append(msgs, upMsg{f.doc, f.data})
			}
		default:
			return msgs
		}
	}
}

// upUntilClosed reads l's queue until the hub closes it and returns what
// it read, as the upstream writer does. It fails nothing, so that it may
// run on a goroutine of its own.
func (h *hubHarness) upUntilClosed(l *upstreamLink) [][]byte {
	var msgs [][]byte
	for f := range l.send {
		if !isMarker(f) {
			msgs = append(msgs, f.data)
		}
	}
	return msgs
}

// askedOne returns the one of a and b (editors of one document) that the
// hub asked for its document and its awareness, and the other one, which
// was asked nothing.
func (h *hubHarness) askedOne(a, b *conn) (asked, other *conn) {
	h.t.Helper()
	h.barrier()
	got := map[*conn][][]byte{a: h.queued(a), b: h.queued(b)}
	switch {
	case len(got[a]) > 0 && len(got[b]) == 0:
		asked, other = a, b
	case len(got[b]) > 0 && len(got[a]) == 0:
		asked, other = b, a
	default:
		h.t.Fatalf("asked % x and % x, want one editor asked", got[a], got[b])
	}
	if want := [][]byte{emptyStep1, queryAwareness}; !slices.EqualFunc(got[asked], want, bytes.Equal) {
		h.t.Fatalf("the asked editor got % x, want % x", got[asked], want)
	}
	return asked, other
}

// TestRoutingRules checks who hears each kind of message: its sender, the
// other editors of its document, an editor of another document, the
// upstream. Every case runs an editor a on d1, a second editor b on d1
// unless a is lone, an editor c on d2, and an upstream link if attached.
// An upstream message counts all of d1's editors as "others".
func TestRoutingRules(t *testing.T) {
	aware := awarenessMsg(5, 1, "{}") // an editor's own client
	step2 := []byte{msgSync, syncStep2, 1, 0xb2}
	query := []byte{msgQueryAwareness}
	auth := []byte{msgAuth, 0, 0} // y-websocket: "permission denied"
	tests := []struct {
		name string
		from string // "editor" (a) or "upstream"
		doc  string // the message's document; "": d1
		msg  []byte
		up   bool   // an upstream link is attached
		lone bool   // a is d1's only editor
		want string // who hears msg, of: sender others elsewhere upstream
	}{
		{"step 1 from an editor", "editor", "", step1, true, false, "others upstream"},
		{"step 1 from an editor, upstream down", "editor", "", step1, false, false, "others"},
		{"step 1 from a lone editor", "editor", "", step1, true, true, "upstream"},
		{"step 1 from a lone editor, upstream down", "editor", "", step1, false, true, ""},
		{"step 2 from an editor", "editor", "", step2, true, false, "others upstream"},
		{"step 2 from an editor, upstream down", "editor", "", step2, false, false, "others"},
		{"update from an editor", "editor", "", update1, true, false, "others upstream"},
		{"update from an editor, upstream down", "editor", "", update1, false, false, "others"},
		{"update from a lone editor", "editor", "", update1, true, true, "upstream"},
		{"update from a lone editor, upstream down", "editor", "", update1, false, true, ""},
		{"awareness from an editor", "editor", "", aware, true, false, "sender others upstream"},
		{"awareness from an editor, upstream down", "editor", "", aware, false, false, "sender others"},
		{"awareness from a lone editor", "editor", "", aware, true, true, "sender upstream"},
		{"awareness from a lone editor, upstream down", "editor", "", aware, false, true, "sender"},
		{"query-awareness from an editor", "editor", "", query, true, false, "others upstream"},
		{"query-awareness from a lone editor, upstream down", "editor", "", query, false, true, ""},
		{"auth from an editor", "editor", "", auth, true, false, "others upstream"},
		{"step 1 from the upstream", "upstream", "", step1, true, false, "others"},
		{"step 2 from the upstream", "upstream", "", step2, true, false, "others"},
		{"update from the upstream", "upstream", "", update1, true, false, "others"},
		{"update from the upstream to a lone editor", "upstream", "", update1, true, true, "others"},
		{"update from the upstream after its link ended", "upstream", "", update1, false, false, "others"},
		{"update from the upstream for a document without editors", "upstream", "nobody-here", update1, true, false, ""},
		// A client new to the relay also makes one editor be asked for
		// its awareness: TestHubIntroducesNewcomersFromOtherRelays.
		{"awareness from the upstream", "upstream", "", awareness, true, false, "others"},
		{"query-awareness from the upstream", "upstream", "", query, true, false, "others"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := startHub(t, nil, nil)
			var up *upstreamLink
			if tt.up {
				up = h.attach(upstreamQueue)
			}
			a := h.join("d1", connQueue)
			var b *conn
			if !tt.lone {
				b = h.join("d1", connQueue)
			}
			c := h.join("d2", connQueue)
			h.barrier()
			h.queued(a) // the joins' queries
			if up != nil {
				h.queuedUp(up)
			}

			doc := cmp.Or(tt.doc, "d1")
			if tt.from == "editor" {
				h.post(a, tt.msg)
			} else {
				h.fromUpstream(doc, tt.msg)
			}
			h.barrier()

			hears := make(map[string]bool)
			for _, who := range strings.Fields(tt.want) {
				hears[who] = true
			}
			check := func(name string, got [][]byte, want bool) {
				t.Helper()
				switch {
				case want && !(len(got) == 1 && bytes.Equal(got[0], tt.msg)):
					t.Errorf("%s got % x, want % x once", name, got, tt.msg)
				case !want && len(got) > 0:
					t.Errorf("%s got % x, want nothing", name, got)
				}
			}
			if tt.from == "editor" {
				check("sender a", h.queued(a), hears["sender"])
			} else {
				check("editor a of d1", h.queued(a), hears["others"])
			}
			if b != nil {
				check("editor b of d1", h.queued(b), hears["others"])
			}
			check("editor c of d2", h.queued(c), hears["elsewhere"])
			if up != nil {
				var got [][]byte
				for _, m := range h.queuedUp(up) {
					if m.doc != doc {
						t.Errorf("upstream got % x for %s, want %s", m.data, m.doc, doc)
					}
					got = append(got, m.data)
				}
				check("upstream", got, hears["upstream"])
			}
		})
	}
}

func TestHubQueriesAwarenessOnJoin(t *testing.T) {
	h := startHub(t, nil, nil)
	a, b := h.twoEditors("d1")
	c := h.join("d1", connQueue)
	h.expect(a, queryAwareness)
	h.expect(b, queryAwareness)
	h.post(c, update1)
	h.expect(a, update1) // nothing was queued for c at its own join
	h.expect(b, update1)
	h.expectEmpty(c)
}

func TestHubClosesSlowEditorWithoutStallingOthers(t *testing.T) {
	h := startHub(t, nil, nil)
	up := h.attach(upstreamQueue)
	a := h.join("d1", connQueue)
	slow := h.join("d1", 1)
	b := h.join("d1", connQueue)
	const n = 50
	for i := range n {
		h.post(a, []byte{msgSync, syncUpdate, 1, byte(i)})
	}
	for i := range n {
		h.expect(b, []byte{msgSync, syncUpdate, 1, byte(i)})
		if m, _ := h.nextUp(up); m.data[3] != byte(i) {
			t.Fatalf("upstream got % x out of order", m.data)
		}
	}
	h.expectClosed(slow, closeTryAgain)
	// The slow conn's reader may still report its end: the hub ignores it.
	h.leaveWith(slow, closeNormal)
	h.post(b, update1)
	h.expect(a, queryAwareness) // slow's arrival
	h.expect(a, queryAwareness) // b's arrival
	h.expect(a, update1)
}

func TestHubLeaveClosesConn(t *testing.T) {
	h := startHub(t, nil, nil)
	a := h.join("d1", connQueue)
	b := h.join("d1", connQueue)
	h.leaveWith(b, closeUnsupported)
	h.expectClosed(b, closeUnsupported)
	h.post(a, awareness)
	h.expect(a, queryAwareness)
	h.expect(a, awareness)
	// The document is gone once its last editor left.
	h.leave(a)
	h.expectClosed(a, closeNormal)
	h.fromUpstream("d1", update1)
	c := h.join("d1", connQueue)
	h.post(c, awareness)
	h.expect(c, awareness) // not update1, which found no editor
}

func TestHubFullUpstreamQueueClosesLink(t *testing.T) {
	h := startHub(t, nil, nil)
	up := h.attach(1)
	a := h.join("d1", connQueue)
	h.post(a, update1)
	h.post(a, update2) // does not fit: the link is closed
	h.post(a, awareness)
	h.expect(a, awareness)
	if m, ok := h.nextUp(up); !ok || !bytes.Equal(m.data, update1) {
		t.Fatalf("got % x, %v; want the queued update1", m.data, ok)
	}
	if _, ok := h.nextUp(up); ok {
		t.Fatal("link still open after its queue filled")
	}
	// Local editing goes on, and a new link gets a resync, then new frames.
	next := h.attach(upstreamQueue)
	h.post(a, update1)
	for _, want := range [][]byte{emptyStep1, update1} {
		if m, _ := h.nextUp(next); m.doc != "d1" || !bytes.Equal(m.data, want) {
			t.Errorf("new link got %s % x, want d1 % x", m.doc, m.data, want)
		}
	}
}

func TestHubDetachIgnoresOldLink(t *testing.T) {
	h := startHub(t, nil, nil)
	old := h.attach(upstreamQueue)
	current := h.attach(upstreamQueue) // replaces and closes old
	if _, ok := h.nextUp(old); ok {
		t.Fatal("old link still open")
	}
	h.detach(old)
	a := h.join("d1", connQueue)
	h.post(a, update1)
	if m, _ := h.nextUp(current); !bytes.Equal(m.data, update1) {
		t.Errorf("got % x, want % x", m.data, update1)
	}
}

func TestHubStopClosesEverything(t *testing.T) {
	h := startHub(t, nil, nil)
	up := h.attach(upstreamQueue)
	a := h.join("d1", connQueue)
	b := h.join("d2", connQueue)
	h.post(a, update1)
	h.beginStop()
	h.expectClosed(a, closeGoingAway)
	h.expectClosed(b, closeGoingAway)
	// What a reader still delivers before it leaves goes upstream too.
	h.post(a, update2)
	h.leave(a)
	h.leave(b)
	h.stop()
	for _, want := range [][]byte{update1, update2} {
		if m, ok := h.nextUp(up); !ok || !bytes.Equal(m.data, want) {
			t.Errorf("got % x, %v; want % x before the close", m.data, ok, want)
		}
	}
	if _, ok := h.nextUp(up); ok {
		t.Error("link still open after stop")
	}
}

func TestHubResyncsEveryDocumentOnAttach(t *testing.T) {
	h := startHub(t, nil, nil)
	a, b := h.twoEditors("d1")
	c := h.join("d2", connQueue)
	up := h.attach(upstreamQueue)
	// Upstream: an empty step 1 for each document, which joins its room.
	got := map[string]bool{}
	for range 2 {
		m, _ := h.nextUp(up)
		if !bytes.Equal(m.data, emptyStep1) {
			t.Fatalf("upstream got % x for %s, want the empty step 1", m.data, m.doc)
		}
		got[m.doc] = true
	}
	if !got["d1"] || !got["d2"] {
		t.Errorf("resynced %v, want d1 and d2", got)
	}
	// Locally: exactly one editor of each document is asked for its state
	// and its awareness.
	h.expect(c, emptyStep1)
	h.expect(c, queryAwareness)
	h.askedOne(a, b)
	// The answer goes upstream like any local message.
	h.post(a, update1)
	if m, _ := h.nextUp(up); !bytes.Equal(m.data, update1) {
		t.Errorf("upstream got % x, want the answer % x", m.data, update1)
	}
}

func TestHubAsksAnotherEditorWhenTheAskedOneLeaves(t *testing.T) {
	h := startHub(t, nil, nil)
	a, b := h.twoEditors("d1")
	h.attach(upstreamQueue)
	asked, other := h.askedOne(a, b)
	h.leave(asked) // before it answered
	h.expect(other, emptyStep1)
	h.expect(other, queryAwareness)
	// Once the step 2 is in, a leaving editor causes no new question.
	c := h.join("d1", connQueue)
	h.expect(other, queryAwareness) // c's arrival
	step2 := []byte{msgSync, syncStep2, 2, 0, 0}
	h.post(other, step2) // the answer to its join's step 1
	h.post(other, step2) // and to the resync's
	h.expect(c, step2)
	h.expect(c, step2)
	h.leave(other)
	h.post(c, awareness)
	h.expect(c, awareness) // no step 1 before it
}

func TestHubResyncSkipsAnEditorClosedAsSlow(t *testing.T) {
	h := startHub(t, nil, nil)
	slow := h.stuffed("d1")
	h.attach(upstreamQueue) // asks slow, whose queue is full: closed, no panic
	h.barrier()
	h.expectClosed(slow, closeTryAgain)
	// The next editor of the document is asked in its place.
	b := h.join("d1", connQueue)
	h.attach(upstreamQueue)
	h.expect(b, emptyStep1)
	h.expect(b, queryAwareness)
}

func TestHubNewcomerSurvivesTheCloseOfASlowEditor(t *testing.T) {
	h := startHub(t, nil, nil)
	slow := h.stuffed("d1")
	b := h.join("d1", connQueue) // its query closes slow, the only other editor
	h.barrier()
	h.expectClosed(slow, closeTryAgain)
	c := h.join("d1", connQueue)
	h.expect(b, queryAwareness) // c's arrival: b is still in the document
	h.post(c, update1)
	h.expect(b, update1)
	h.leave(b)
	h.expectClosed(b, closeNormal)
}

// slowOwnerOf5 joins an editor a and an editor slow with a queue of two to
// doc; slow announces awareness client 5, which a has seen.
func (h *hubHarness) slowOwnerOf5(doc string) (a, slow *conn) {
	h.t.Helper()
	a = h.join(doc, connQueue)
	slow = h.join(doc, 2)
	h.expect(a, queryAwareness)
	h.post(slow, awarenessMsg(5, 1, "{}"))
	h.expect(a, awarenessMsg(5, 1, "{}"))
	return a, slow
}

func TestHubDropsAwarenessFromAClosedEditor(t *testing.T) {
	h := startHub(t, nil, nil)
	a, slow := h.slowOwnerOf5("d1")
	h.post(a, update1)
	h.post(a, update2) // closes slow
	h.expect(a, awarenessMsg(5, 2, "null"))
	// slow's reader still delivers a cursor move and an update.
	h.post(slow, awarenessMsg(5, 3, `{"cursor":1}`))
	h.post(slow, []byte{msgSync, syncUpdate, 1, 0x55})
	h.expect(a, []byte{msgSync, syncUpdate, 1, 0x55}) // the update, not the ghost
}

func TestHubRevivesAClientThatComesBack(t *testing.T) {
	h := startHub(t, nil, nil)
	a, b := h.twoEditors("d1")
	h.post(b, awarenessMsg(7, 4, "{}"))
	h.expect(a, awarenessMsg(7, 4, "{}"))
	h.leave(b)
	h.expect(a, awarenessMsg(7, 5, "null"))
	// The same client reconnects, announcing its old clock, which every
	// peer would ignore: the relay tells it it was gone at 5.
	back := h.join("d1", connQueue)
	h.expect(a, queryAwareness)
	h.post(back, awarenessMsg(7, 4, "{}"))
	h.expect(back, awarenessMsg(7, 5, "null"))
	h.expect(back, awarenessMsg(7, 4, "{}")) // its echo
	// Its answer at clock 6 reaches everyone; nothing more is sent back.
	h.post(back, awarenessMsg(7, 6, "{}"))
	h.expect(a, awarenessMsg(7, 4, "{}"))
	h.expect(a, awarenessMsg(7, 6, "{}"))
	h.expect(back, awarenessMsg(7, 6, "{}"))
	h.expectEmpty(back)
}

func TestHubSendsRemovalsMadeWhileDownOnReconnect(t *testing.T) {
	h := startHub(t, nil, nil)
	a, b := h.twoEditors("d1")
	h.post(b, awarenessMsg(9, 2, "{}"))
	h.expect(a, awarenessMsg(9, 2, "{}"))
	h.leave(b) // the upstream is down
	h.expect(a, awarenessMsg(9, 3, "null"))
	up := h.attach(upstreamQueue)
	h.expectUpstream(up, awarenessMsg(9, 3, "null"))
}

func TestHubResyncAnswerIsTheStep2ForItsOwnStep1(t *testing.T) {
	h := startHub(t, nil, nil)
	a := h.join("d1", connQueue)
	newcomer := h.join("d1", connQueue)
	h.expect(a, queryAwareness)
	h.post(newcomer, step1) // a owes the newcomer a step 2
	h.expect(a, step1)
	h.leave(newcomer)
	h.attach(upstreamQueue) // asks a, the only editor
	h.expect(a, emptyStep1)
	h.expect(a, queryAwareness)
	c := h.join("d1", connQueue)
	h.expect(a, queryAwareness)
	h.post(a, []byte{msgSync, syncStep2, 2, 0, 0}) // answers the newcomer only
	h.leave(a)                                     // before it answered the resync
	h.expect(c, []byte{msgSync, syncStep2, 2, 0, 0})
	h.expect(c, emptyStep1) // so c is asked in its place
	h.expect(c, queryAwareness)
}

func TestHubMarksAwarenessGoneWhenEditorLeaves(t *testing.T) {
	h := startHub(t, nil, nil)
	up := h.attach(upstreamQueue)
	a, b := h.twoEditors("d1")

	own := awarenessMsg(7, 3, `{"user":"a"}`, 8, 1, `{"user":"a2"}`)
	h.post(a, own)
	h.expect(a, own)
	h.expect(b, own)
	// b re-broadcasts a's state, as y-websocket clients do: it owns none of it.
	h.post(b, awarenessMsg(7, 3, `{"user":"a"}`))
	h.expect(a, awarenessMsg(7, 3, `{"user":"a"}`))
	h.expect(b, awarenessMsg(7, 3, `{"user":"a"}`))
	// A remote client, announced by the upstream. It is new to the relay,
	// so one of the editors, either, is asked for the states it knows.
	remote := awarenessMsg(99, 5, `{"user":"r"}`)
	h.fromUpstream("d1", remote)
	h.expect(a, remote)
	h.expect(b, remote)
	h.barrier()
	if got := append(h.queued(a), h.queued(b)...); len(got) != 1 || !bytes.Equal(got[0], queryAwareness) {
		t.Fatalf("after the remote newcomer the editors got % x, want one query-awareness", got)
	}

	h.leave(a)
	h.expectClosed(a, closeNormal)
	got := h.next(b)
	entries := mustAwareness(t, got)
	slices.SortFunc(entries, func(x, y awarenessEntry) int { return int(x.client) - int(y.client) })
	if want := []awarenessEntry{{7, 4, true}, {8, 2, true}}; !slices.Equal(entries, want) {
		t.Errorf("b got %v, want %v", entries, want)
	}
	h.expectUpstream(up, got) // the upstream hears of it too
	// b leaving marks nothing gone: it owns no client.
	c := h.join("d1", connQueue)
	h.leave(b)
	h.expectClosed(b, closeNormal)
	h.post(c, awarenessMsg(1, 1, "{}"))
	h.expect(c, awarenessMsg(1, 1, "{}"))
}

func TestHubMarksAwarenessGoneForSlowEditor(t *testing.T) {
	h := startHub(t, nil, nil)
	a, slow := h.slowOwnerOf5("d1")
	h.post(a, update1) // slow's queue: its own echo, update1
	h.post(a, update2) // full: slow is closed
	h.post(a, awareness)
	h.expect(a, awarenessMsg(5, 2, "null")) // slow's client is gone
	h.expect(a, awareness)                  // all three routed
	h.expectClosed(slow, closeTryAgain)
}

func TestHubAwarenessClocks(t *testing.T) {
	h := startHub(t, nil, nil)
	a, b := h.twoEditors("d1")
	h.post(a, awarenessMsg(7, 3, "{}"))
	h.expect(b, awarenessMsg(7, 3, "{}"))
	// b announces a newer clock for 7 first: now b owns it (say, a client
	// that moved from a to b).
	h.post(b, awarenessMsg(7, 4, "{}"))
	h.expect(b, awarenessMsg(7, 4, "{}"))
	// An old clock from a changes nothing.
	h.post(a, awarenessMsg(7, 2, "{}"))
	h.expect(b, awarenessMsg(7, 2, "{}"))
	h.leave(a)
	h.expectClosed(a, closeNormal)
	h.post(b, awarenessMsg(1, 1, "{}"))
	h.expect(b, awarenessMsg(1, 1, "{}")) // no removal for 7 came first
	// A null at the current clock forgets the client: b's leaving says nothing.
	c := h.join("d1", connQueue)
	h.expect(b, queryAwareness)
	h.post(b, awarenessMsg(7, 4, "null"))
	h.expect(c, awarenessMsg(7, 4, "null"))
	h.leave(b)
	h.expectClosed(b, closeNormal)
	h.expect(c, awarenessMsg(1, 2, "null")) // only client 1
}

// mustAwareness decodes an awareness message or fails the test.
func mustAwareness(t *testing.T, msg []byte) []awarenessEntry {
	t.Helper()
	entries, err := readAwareness(msg, nil)
	if err != nil {
		t.Fatalf("awareness % x: %v", msg, err)
	}
	return entries
}

// BenchmarkHubRoute measures the hub alone: one local update routed to
// benchEditors other editors and the upstream queue, all drained.
func BenchmarkHubRoute(b *testing.B) {
	h := startHub(b, nil, nil)
	up := h.attach(upstreamQueue)
	sender := h.join("d", connQueue)
	var conns []*conn
	for range benchEditors {
		conns = append(conns, h.join("d", connQueue))
	}
	h.barrier()
	for _, c := range append(conns, sender) {
		h.queued(c) // the join queries
	}
	msg := []byte{msgSync, syncUpdate, 4, 1, 2, 3, 4}
	b.ReportAllocs()
	b.ResetTimer()
	var drained sync.WaitGroup
	for _, c := range conns {
		drained.Go(func() { h.drain(c, b.N) })
	}
	drained.Go(func() { h.drainUp(up, b.N) })
	f := h.frame("d", msg, sender) // the reader's decoding is not the hub's cost
	for range b.N {
		h.postFrame(f)
	}
	drained.Wait()
}

// benchEditors is how many editors receive each message in the benchmarks.
const benchEditors = 8

// benchWindow bounds the messages in flight in BenchmarkRelayFanOut. An
// unpaced sender would outrun any relay that writes to 8 sockets per
// message it reads, and the relay closes editors that fall connQueue
// frames behind; real editors send far slower than that.
const benchWindow = 64

// BenchmarkRelayFanOut measures the whole relay over loopback sockets: one
// editor sends real Yjs updates of 64 bytes (one text insertion each),
// benchEditors others receive each of them, and each goes upstream to an
// in-test ELVA server; at most benchWindow messages are in flight. It runs
// without the store and with it (data directory in a temporary directory,
// default --fsync-interval), so that the store's cost shows. With
// ELVA_BENCH_ADDR set, the same load goes to that address instead, for
// example to ../shared/bench/rawrelay.
func BenchmarkRelayFanOut(b *testing.B) {
	if addr := os.Getenv("ELVA_BENCH_ADDR"); addr != "" {
		benchFanOut(b, addr)
		return
	}
	for _, mode := range []struct{ name, flag string }{{"no-store", "--no-store"}, {"store", "--data-dir"}} {
		b.Run(mode.name, func(b *testing.B) {
			srv := newELVAServer(b, magicSeed)
			srv.frames = nil
			args := []string{"--server", srv.url(), mode.flag}
			if mode.flag == "--data-dir" {
				args = append(args, b.TempDir())
			}
			r := startRelayAt(b, slog.LevelInfo, args...)
			r.logs.waitFor(b, "upstream connected")
			benchFanOut(b, r.addr)
		})
	}
}

// benchFanOut sends b.N updates to a document at addr from one editor and
// waits until each of benchEditors others has received them all.
func benchFanOut(b *testing.B, addr string) {
	doc := fmt.Sprintf("bench-%d", b.N)
	sender := dialLocal(b, addr, doc)
	var receivers []*websocket.Conn
	for range benchEditors {
		receivers = append(receivers, dialLocal(b, addr, doc))
	}
	warmUp(b, sender, receivers)
	const content = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOP" // 52 UTF-16 units
	client := uint64(1000 + b.N)
	msg := benchUpdate(nil, client, 0, content)
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	b.ResetTimer()
	progress := make(chan error, benchEditors*(b.N/benchWindow+2))
	for _, ws := range receivers {
		go receiveCounting(ws, b.N, progress)
	}
	for sent := 0; sent < b.N; {
		batch := min(benchWindow, b.N-sent)
		for i := range batch {
			msg = benchUpdate(msg[:0], client, uint64((sent+i)*len(content)), content)
			if err := websocket.Message.Send(sender, msg); err != nil {
				b.Fatal(err)
			}
		}
		sent += batch
		for range benchEditors {
			if err := <-progress; err != nil {
				b.Fatalf("receiver: %v", err)
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N*benchEditors)/b.Elapsed().Seconds(), "deliveries/s")
}

// benchUpdate appends to b a sync update message whose Yjs update (format
// v1) has client insert content at the end of the root Y.Text "text" as
// its item at clock: the first names its parent, each later one its
// origin, the last character of the item before (yjs/src/structs/Item.js
// write; info byte: content ref 4 = ContentString, 0x80 = has origin).
func benchUpdate(b []byte, client, clock uint64, content string) []byte {
	u := []byte{1, 1} // one client, one struct
	u = appendVaruint(u, client)
	u = appendVaruint(u, clock)
	if clock == 0 {
		u = append(u, 4, 1, 4) // no origin: parent by root name, 4 bytes
		u = append(u, "text"...)
	} else {
		u = append(u, 0x84)
		u = appendVaruint(u, client)
		u = appendVaruint(u, clock-1)
	}
	u = appendVaruint(u, uint64(len(content)))
	u = append(u, content...)
	u = append(u, 0) // an empty delete set
	return appendSyncMessage(b, syncUpdate, u)
}

// benchHello is the warm-up's message: an empty update, valid for a store.
var benchHello = []byte{msgSync, syncUpdate, 2, 0, 0}

// warmUp returns once every receiver has heard the sender: a relay may
// register a connection a little after its handshake. It works with any
// relay, ours or rawrelay, as it needs no echo.
func warmUp(b *testing.B, sender *websocket.Conn, receivers []*websocket.Conn) {
	b.Helper()
	hello := benchHello
	heard := make(chan error, len(receivers))
	for _, ws := range receivers {
		go func() {
			ws.SetReadDeadline(time.Now().Add(testTimeout))
			for {
				var m []byte
				if err := websocket.Message.Receive(ws, &m); err != nil || bytes.Equal(m, hello) {
					heard <- err
					return
				}
			}
		}()
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for waiting := len(receivers); waiting > 0; {
		send(b, sender, hello)
		select {
		case err := <-heard:
			if err != nil {
				b.Fatalf("warm-up: %v", err)
			}
			waiting--
		case <-tick.C: // say hello again to those who joined late
		}
	}
}

// receiveCounting reads n sync updates longer than the warm-up's from ws
// and reports on progress after every benchWindow of them and after the
// last; other messages (a step 1 from the store, awareness) are skipped.
func receiveCounting(ws *websocket.Conn, n int, progress chan<- error) {
	ws.SetReadDeadline(time.Now().Add(time.Minute))
	for got := 0; got < n; {
		var m []byte
		if err := websocket.Message.Receive(ws, &m); err != nil {
			progress <- err
			return
		}
		if len(m) <= len(benchHello) || m[0] != msgSync || m[1] != syncUpdate {
			continue
		}
		got++
		if got%benchWindow == 0 || got == n {
			progress <- nil
		}
	}
}

func TestHubClosesEditorOverItsByteBudget(t *testing.T) {
	h := startHub(t, nil, nil)
	a := h.join("d1", connQueue)
	b := h.join("d1", connQueue) // reads nothing
	h.expect(a, queryAwareness)
	big := updateMsg(make([]byte, h.sendBudget()/2)) // two do not fit, however few frames
	h.post(a, big)
	h.post(a, big)
	h.post(a, awareness)
	h.expect(a, awareness)           // both routed
	h.expectClosed(b, closeTryAgain) // with one frame queued of 256
}

func TestHubNoGhostWhenReviveClosesItsEditor(t *testing.T) {
	h := startHub(t, nil, nil)
	a, b := h.twoEditors("d1")
	h.post(b, awarenessMsg(7, 4, "{}"))
	h.expect(a, awarenessMsg(7, 4, "{}"))
	h.leave(b)
	h.expect(a, awarenessMsg(7, 5, "null"))
	back := h.stuffed("d1") // full: the revive closes it
	h.expect(a, queryAwareness)
	h.post(back, awarenessMsg(7, 4, "{}", 8, 1, `{"cursor":1}`))
	h.barrier()
	h.expectClosed(back, closeTryAgain)
	// Neither client 7 nor 8 reached a, so no removal is owed either.
	h.post(a, awareness)
	h.expect(a, awareness)
}

func TestHubRemovalsKeptWhileDownAreOnePerClient(t *testing.T) {
	h := startHub(t, nil, nil)
	h.join("d1", connQueue) // keeps the document open
	for i := range 1100 {   // one client that flaps while the upstream is down
		b := h.join("d1", connQueue)
		h.post(b, awarenessMsg(9, 2*i+2, "{}"))
		h.expect(b, awarenessMsg(9, 2*i+2, "{}"))
		h.leave(b)
	}
	up := h.attach(upstreamQueue)
	h.expectUpstream(up, awarenessMsg(9, 2*1099+3, "null")) // its last clock only
}

func TestHubGoodbyesAtStopDoNotCloseTheLink(t *testing.T) {
	h := startHub(t, nil, nil)
	up := h.attach(2)
	a := h.join("d1", connQueue)
	h.post(a, awarenessMsg(5, 1, "{}")) // queue: 1 of 2
	h.post(a, update1)                  // queue: 2 of 2
	h.barrier()
	h.beginStop() // a's removal does not fit
	h.expectClosed(a, closeGoingAway)
	got := make(chan [][]byte)
	go func() { got <- h.upUntilClosed(up) }() // the upstream writer drains the queue meanwhile
	h.post(a, update2)                         // the reader still delivers
	h.leave(a)
	h.stop()
	frames := <-got
	if !slices.ContainsFunc(frames, func(b []byte) bool { return bytes.Equal(b, update2) }) {
		t.Errorf("update2, accepted during the stop, never reached the upstream: % x", frames)
	}
}

// TestHubAsksANewcomerForItsDocument checks that a joining editor gets a
// step 1, as a Yjs server sends one, so that what it made while
// disconnected reaches the editors already there, with no upstream.
func TestHubAsksANewcomerForItsDocument(t *testing.T) {
	h := startHub(t, nil, nil)
	a := h.join("d1", connQueue)
	b := h.join("d1", connQueue) // join checks b's step 1
	h.expect(a, queryAwareness)
	offline := []byte{msgSync, syncStep2, 2, 0xb1, 0}
	h.post(b, offline)
	h.expect(a, offline)
}

// TestHubIntroducesNewcomersFromOtherRelays checks that a client new to
// the relay, announced by the upstream, makes the relay ask one local
// editor for the states it knows, which then go upstream: an editor on
// another relay sees this relay's editors at once, not at their renewal.
func TestHubIntroducesNewcomersFromOtherRelays(t *testing.T) {
	h := startHub(t, nil, nil)
	a := h.join("d1", connQueue)
	up := h.attach(upstreamQueue)
	h.expect(a, emptyStep1) // the resync
	h.expect(a, queryAwareness)
	h.expectUpstream(up, emptyStep1)
	h.fromUpstream("d1", awarenessMsg(42, 1, "{}"))
	h.expect(a, awarenessMsg(42, 1, "{}"))
	h.expect(a, queryAwareness)
	// A known client's renewal, and another newcomer within a second,
	// cause no second question.
	h.fromUpstream("d1", awarenessMsg(42, 2, "{}"))
	h.fromUpstream("d1", awarenessMsg(43, 1, "{}"))
	h.expect(a, awarenessMsg(42, 2, "{}"))
	h.expect(a, awarenessMsg(43, 1, "{}"))
	h.post(a, awareness)
	h.expect(a, awareness)
}

// TestHubAsksNobodyWhileTheUpstreamIsDown checks that when the editor
// asked for its document leaves while the upstream is down, nobody else
// is asked: the answer could go nowhere, and the reconnect asks anyway.
func TestHubAsksNobodyWhileTheUpstreamIsDown(t *testing.T) {
	h := startHub(t, nil, nil)
	a, b := h.twoEditors("d1")
	up := h.attach(upstreamQueue)
	asked, other := h.askedOne(a, b)
	h.detach(up)
	h.leave(asked)
	h.post(other, awareness)
	h.expect(other, awareness) // no step 1 before it
}

// TestHubNeverSendsTheUpstreamMoreThanItsLimit checks that a message over
// --upstream-max-message reaches the local editors but not the upstream,
// that its document is named once, that nothing later of it goes (it
// would depend on the missing one) while other documents do, and that the
// next connection resyncs it.
func TestHubNeverSendsTheUpstreamMoreThanItsLimit(t *testing.T) {
	logs := newLogBuffer()
	h := startHub(t, slog.New(slog.NewTextHandler(logs, nil)), withUpstreamMax(100))
	up := h.attach(upstreamQueue)
	a, b := h.twoEditors("big")
	tooBig := updateMsg(make([]byte, 100))
	h.post(a, tooBig)
	h.post(a, tooBig)
	h.expect(b, tooBig)
	h.expect(b, tooBig)
	h.post(a, update1) // after the gap: not sent
	other := h.join("small", connQueue)
	h.post(other, update2)
	h.expectUpstream(up, update2)
	next := h.attach(upstreamQueue) // a reconnect resyncs "big" whole
	for range 2 {
		if m, _ := h.nextUp(next); m.doc == "big" && !bytes.Equal(m.data, emptyStep1) {
			t.Errorf("after the reconnect, % x went up for big before its resync", m.data)
		}
	}
	if n := strings.Count(logs.String(), "message too large for the upstream"); n != 1 {
		t.Errorf("%d warnings, want 1:\n%s", n, logs.String())
	}
	if line := logs.waitFor(t, "too large"); !strings.Contains(line, "doc=big") || !strings.Contains(line, "limit=100") {
		t.Errorf("the warning does not say which document and limit: %s", line)
	}
}

// TestHubStopNeverLeavesAGapUpstream checks that once a sync message of a
// document could not be flushed at the stop, nothing later of it is: the
// server must never get update n+1 without update n.
func TestHubStopNeverLeavesAGapUpstream(t *testing.T) {
	logs := newLogBuffer()
	h := startHub(t, slog.New(slog.NewTextHandler(logs, nil)), withStopWait(50*time.Millisecond))
	up := h.attach(1)
	a := h.join("d1", connQueue)
	h.post(a, update1) // fills the upstream queue
	h.barrier()
	h.beginStop()
	h.expectClosed(a, closeGoingAway)
	h.post(a, update2) // finds no room in time
	logs.waitFor(t, "not flushed")
	h.expectUpstream(up, update1) // room again
	update3 := []byte{msgSync, syncUpdate, 1, 0xa3}
	h.post(a, update3)
	h.leave(a)
	h.stop()
	for _, msg := range h.upUntilClosed(up) {
		t.Errorf("% x went upstream after update2 was dropped", msg)
	}
}

// TestGoneTable checks the rules of the table of clients marked gone:
// entries expire after goneTTL, a new note renews one, the bound drops
// the oldest one at a time (never all at once, owed ones included), the
// owed removals are handed out once, and an emptied table lets its memory
// go.
func TestGoneTable(t *testing.T) {
	t0 := time.Unix(1000, 0)
	type step struct {
		op     string // note, owednote, expire, forget, takeOwed
		doc    string
		client uint64
		at     time.Duration // after t0
	}
	tests := []struct {
		name  string
		max   int
		steps []step
		want  []string // doc/client of the entries left, sorted
		owed  int      // removals that takeOwed hands out at the end
	}{
		{"kept before the TTL", 0, []step{{"note", "d", 1, 0}, {"expire", "", 0, goneTTL - time.Second}}, []string{"d/1"}, 0},
		{"gone after the TTL", 0, []step{{"note", "d", 1, 0}, {"expire", "", 0, goneTTL}}, nil, 0},
		{"a new note renews", 0, []step{{"note", "d", 1, 0}, {"note", "d", 1, 20 * time.Second}, {"expire", "", 0, goneTTL + time.Second}}, []string{"d/1"}, 0},
		{"forget", 0, []step{{"note", "d", 1, 0}, {"note", "e", 1, 0}, {"forget", "d", 1, 0}}, []string{"e/1"}, 0},
		{"bound drops the oldest only", 3, []step{{"owednote", "a", 1, 0}, {"owednote", "b", 1, 1}, {"owednote", "c", 1, 2}, {"owednote", "d", 1, 3}}, []string{"b/1", "c/1", "d/1"}, 3},
		{"owed handed out once", 0, []step{{"owednote", "a", 1, 0}, {"note", "a", 2, 0}, {"takeOwed", "", 0, 0}}, []string{"a/1", "a/2"}, 0},
		{"owed expire too", 0, []step{{"owednote", "a", 1, 0}, {"expire", "", 0, goneTTL}}, nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := goneTable{max: tt.max}
			for _, s := range tt.steps {
				now := t0.Add(s.at)
				switch s.op {
				case "note", "owednote":
					g.note(s.doc, s.client, 7, s.op == "owednote", now)
				case "expire":
					g.expire(now)
				case "forget":
					g.forget(s.doc, s.client)
				case "takeOwed":
					g.takeOwed()
				}
			}
			var left []string
			for k := range g.entries {
				left = append(left, fmt.Sprintf("%s/%d", k.doc, k.client))
			}
			slices.Sort(left)
			if !slices.Equal(left, tt.want) {
				t.Errorf("left %v, want %v", left, tt.want)
			}
			owed := 0
			for _, gone := range g.takeOwed() {
				owed += len(gone)
			}
			if owed != tt.owed {
				t.Errorf("%d removals owed, want %d", owed, tt.owed)
			}
			if len(tt.want) == 0 && (g.entries != nil || g.order != nil) {
				t.Error("an empty table still holds its memory")
			}
		})
	}
}

// TestHubForgetsDepartedClients plays the report: many editors on many
// documents announce awareness clients and leave. The hub's table of gone
// clients stays within its bound, and once the records expired it is
// empty, with the removals that were owed to the upstream sent first.
func TestHubForgetsDepartedClients(t *testing.T) {
	sweep := make(chan time.Time)
	h := startHub(t, nil, withSweep(sweep))
	for i := range 1100 { // more documents than the old per-document cap
		doc := fmt.Sprintf("d%d", i)
		c := h.join(doc, connQueue)
		h.post(c, awarenessMsg(i+1, 1, "{}"))
		h.expect(c, awarenessMsg(i+1, 1, "{}"))
		h.leave(c)
	}
	up := h.attach(upstreamQueue * 2)
	h.barrier()
	owed := 0
	for _, m := range h.queuedUp(up) {
		if m.data[0] == msgAwareness {
			owed++
		}
	}
	if owed != 1100 {
		t.Errorf("%d removals sent on reconnect, want 1100 (none dropped wholesale)", owed)
	}
	sweep <- time.Now().Add(goneTTL)
	h.barrier()
	if n, holdsMemory := h.goneAfterStop(); n != 0 || holdsMemory {
		t.Errorf("%d gone clients remembered after their TTL (memory held: %v), want none", n, holdsMemory)
	}
}

// TestOwnersRules checks the awareness ownership table without a hub:
// who owns a client after each announcement, and what is new, untracked
// or released.
func TestOwnersRules(t *testing.T) {
	a, b := &conn{}, &conn{}
	type say struct {
		by     *conn // nil: the upstream
		client uint64
		clock  uint64
		gone   bool
	}
	tests := []struct {
		name      string
		max       int
		says      []say
		owner     map[uint64]*conn // the table at the end
		fresh     int              // announcements of clients new to the table
		untracked int
	}{
		{"first with a clock owns it", 0, []say{{a, 1, 1, false}, {b, 1, 1, false}}, map[uint64]*conn{1: a}, 1, 0},
		{"a newer clock takes it over", 0, []say{{a, 1, 1, false}, {b, 1, 2, false}}, map[uint64]*conn{1: b}, 1, 0},
		{"an older clock changes nothing", 0, []say{{a, 1, 5, false}, {b, 1, 4, false}}, map[uint64]*conn{1: a}, 1, 0},
		{"null at the same clock forgets", 0, []say{{a, 1, 3, false}, {b, 1, 3, true}}, map[uint64]*conn{}, 1, 0},
		{"null at a newer clock forgets", 0, []say{{a, 1, 3, false}, {nil, 1, 4, true}}, map[uint64]*conn{}, 1, 0},
		{"null for an unknown client", 0, []say{{a, 1, 3, true}}, map[uint64]*conn{}, 0, 0},
		{"the upstream owns its clients", 0, []say{{nil, 7, 1, false}}, map[uint64]*conn{7: nil}, 1, 0},
		{"full: an upstream client is not tracked", 1, []say{{a, 1, 1, false}, {nil, 2, 1, false}}, map[uint64]*conn{1: a}, 1, 1},
		{"full: a local client evicts the upstream's", 1, []say{{nil, 2, 1, false}, {a, 1, 1, false}}, map[uint64]*conn{1: a}, 2, 0},
		{"full of local clients: not tracked", 1, []say{{a, 1, 1, false}, {b, 2, 1, false}}, map[uint64]*conn{1: a}, 1, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := owners{max: tt.max}
			fresh, untracked := 0, 0
			for _, s := range tt.says {
				isNew, over := o.note(s.by, awarenessEntry{client: s.client, clock: s.clock, gone: s.gone})
				if isNew {
					fresh++
				}
				if over {
					untracked++
				}
			}
			got := make(map[uint64]*conn)
			for id, p := range o.clients {
				got[id] = p.owner
			}
			if !maps.Equal(got, tt.owner) || fresh != tt.fresh || untracked != tt.untracked {
				t.Errorf("table %v, %d new, %d untracked; want %v, %d, %d", got, fresh, untracked, tt.owner, tt.fresh, tt.untracked)
			}
			remote := 0
			for _, p := range o.clients {
				if p.owner == nil {
					remote++
				}
			}
			if remote != o.remote {
				t.Errorf("remote count %d, but %d entries are the upstream's", o.remote, remote)
			}
		})
	}
	o := owners{}
	o.note(a, awarenessEntry{client: 1, clock: 4})
	o.note(a, awarenessEntry{client: 2, clock: 9})
	o.note(b, awarenessEntry{client: 3, clock: 1})
	gone := o.release(a)
	slices.SortFunc(gone, func(x, y awarenessEntry) int { return int(x.client) - int(y.client) })
	if want := []awarenessEntry{{1, 4, false}, {2, 9, false}}; !slices.Equal(gone, want) || len(o.clients) != 1 {
		t.Errorf("release gave %v, left %d; want %v and 1 left", gone, len(o.clients), want)
	}
}

// TestGoneTableWelcomeBack checks when a returning client is sent its
// removal again: only at a clock no newer than the removal's, once.
func TestGoneTableWelcomeBack(t *testing.T) {
	tests := []struct {
		name  string
		clock uint64 // the returning client's
		gone  bool
		want  []byte
	}{
		{"older clock", 3, false, awarenessMsg(9, 6, "null")},
		{"the removal's own clock", 6, false, awarenessMsg(9, 6, "null")},
		{"newer clock: peers take it", 7, false, nil},
		{"a null state", 3, true, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var g goneTable
			g.note("d", 9, 5, false, time.Now()) // removal sent at clock 6
			got := g.welcomeBack("d", awarenessEntry{client: 9, clock: tt.clock, gone: tt.gone})
			if !bytes.Equal(got, tt.want) {
				t.Errorf("got % x, want % x", got, tt.want)
			}
			if again := g.welcomeBack("d", awarenessEntry{client: 9, clock: tt.clock}); again != nil && !tt.gone {
				t.Errorf("a second welcome % x: the client is back already", again)
			}
		})
	}
}

// TestDeliverNeverHandsOnAfterTheHub checks a reader's hand-over: with the
// inbox full and the close frame out it gives up (and the reader then
// hands on nothing more of that editor, so no gap opens), and once the
// hub has stopped it hands on nothing although there is room.
func TestDeliverNeverHandsOnAfterTheHub(t *testing.T) {
	h := newHub(connQueue, defaultMaxMessage, keepalive{}, limits{}, discard)
	c := &conn{peer: peer{log: discard, closing: make(chan struct{})}, doc: "d"}
	for range cap(h.fromEditors) {
		h.fromEditors <- frame{}
	}
	close(c.closing)
	if c.deliver(h, frame{doc: "d", data: update1}) {
		t.Error("a full inbox took a frame from a closing editor")
	}
	<-h.fromEditors // room again, but the hub is gone
	close(h.quit)
	if c.deliver(h, frame{doc: "d", data: update2}) {
		t.Error("a frame was handed on after the hub stopped")
	}
}

// withStore makes the hub hand its store operations to link, which the
// test plays, and hold owed documents, for startHub.
func withStore(link *storeLink, owed ...string) func(*hub) {
	return func(hb *hub) { hb.useStore(link, owed) }
}

// nextOp returns the next operation the hub queued for the store.
func (h *hubHarness) nextOp(link *storeLink) storeOp {
	h.t.Helper()
	select {
	case op := <-link.ops:
		link.backlog.done(len(op.data))
		return op
	case <-time.After(testTimeout):
		h.t.Fatal("nothing queued for the store")
		return storeOp{}
	}
}

// expectOp reads the store's queue until an operation of kind for doc.
func (h *hubHarness) expectOp(link *storeLink, kind storeOpKind, doc string) storeOp {
	h.t.Helper()
	for {
		if op := h.nextOp(link); op.kind == kind && op.doc == doc {
			return op
		}
	}
}

// noOps checks that nothing waits in the store's queue once the hub has
// handled what it was sent.
func (h *hubHarness) noOps(link *storeLink) {
	h.t.Helper()
	h.barrier()
	if len(link.ops) > 0 {
		op := <-link.ops
		h.t.Fatalf("the store was sent op %d of %q (% x)", op.kind, op.doc, op.data)
	}
}

// nextMarker returns the next marker queued on l.
func (h *hubHarness) nextMarker(l *upstreamLink) frame {
	h.t.Helper()
	for {
		select {
		case f := <-l.send:
			if isMarker(f) {
				return f
			}
		case <-time.After(testTimeout):
			h.t.Fatal("no marker queued for the upstream")
			return frame{}
		}
	}
}

// joinStored plays an editor's handler with a store: the newcomer's step
// 1 is the store's to send, so the hub sends it nothing itself.
func (h *hubHarness) joinStored(link *storeLink, doc string) *conn {
	h.t.Helper()
	if err := h.hub.admit(doc); err != nil {
		h.t.Fatalf("admit: %v", err)
	}
	c := testConn(doc, connQueue)
	h.hub.join <- c
	h.t.Cleanup(func() { h.leave(c) })
	if op := h.expectOp(link, opOpen, doc); op.to != c {
		h.t.Fatalf("the store was asked to open %q for another editor", doc)
	}
	return c
}

// TestHubWithStoreRoutesSyncThroughIt checks who hears each sync message
// when a store is there: a step 1 is the store's alone to answer (from an
// editor or from the upstream), every update goes to the store as well as
// where it went before, and the store's answers reach their addressee.
func TestHubWithStoreRoutesSyncThroughIt(t *testing.T) {
	link := newStoreLink()
	h := startHub(t, nil, withStore(link))
	a := h.joinStored(link, "d1")
	b := h.joinStored(link, "d1")
	h.expect(a, queryAwareness)
	l := h.attach(upstreamQueue)
	up := h.expectOp(link, opLinkUp, "d1") // the store syncs it with the server
	h.noOps(link)

	step1 := []byte{msgSync, syncStep1, 1, 0}
	h.post(a, step1)
	if op := h.expectOp(link, opStep1, "d1"); op.to != a || !bytes.Equal(op.data, step1) {
		t.Errorf("editor's step 1 reached the store as %+v", op)
	}
	update := []byte{msgSync, syncUpdate, 2, 0, 0}
	h.post(a, update)
	if op := h.nextOp(link); op.kind != opUpdate || !op.local || !bytes.Equal(op.data, update) {
		t.Errorf("editor's update reached the store as %+v", op)
	}
	h.expect(b, update) // the step 1 went to nobody else
	h.expectUpstream(l, update)
	if got := h.queuedUp(l); len(got) != 0 {
		t.Errorf("the upstream also got % x", got)
	}

	h.fromUpstream("d1", step1)
	if op := h.nextOp(link); op.kind != opStep1 || op.to != nil {
		t.Errorf("upstream step 1 reached the store as %+v", op)
	}
	h.fromUpstream("d1", update)
	if op := h.nextOp(link); op.kind != opUpdate || op.local {
		t.Errorf("upstream update reached the store as %+v", op)
	}
	h.expect(a, update) // not the step 1
	h.expect(b, update)

	answer := []byte{msgSync, syncStep2, 2, 0, 0}
	link.replies <- storeReply{doc: "d1", to: b, data: answer}
	h.expect(b, answer)
	link.replies <- storeReply{doc: "d1", data: step1, gen: up.gen}
	h.expectUpstream(l, step1)
	h.expectEmpty(a)
	h.noOps(link)
}

// TestHubHoldsDocumentsTheStoreOwes checks that a document that owes the
// server edits stays open upstream without editors, from an earlier run
// and after its last editor left, until the store says it is delivered.
func TestHubHoldsDocumentsTheStoreOwes(t *testing.T) {
	link := newStoreLink()
	h := startHub(t, nil, withStore(link, "old"))
	l := &upstreamLink{send: make(chan frame, upstreamQueue), markers: true} // a connection per document
	h.hub.upstream <- upstreamEvent{link: l, attach: true}
	if f := h.nextMarker(l); f.kind != kindDocActive || f.doc != "old" {
		t.Errorf("first marker %d for %q, want the owed document active", f.kind, f.doc)
	}
	h.expectOp(link, opLinkUp, "old")
	// Its connection comes up: the store syncs it again.
	h.hub.upstream <- upstreamEvent{resync: "old"}
	h.expectOp(link, opLinkUp, "old")
	// The server's answer goes to the store although no editor is there.
	step2 := []byte{msgSync, syncStep2, 2, 0, 0}
	h.fromUpstream("old", step2)
	if op := h.expectOp(link, opUpdate, "old"); !bytes.Equal(op.data, step2) {
		t.Errorf("the store got % x, want the server's step 2", op.data)
	}
	link.replies <- storeReply{doc: "old", owedNews: true, owed: false}
	if f := h.nextMarker(l); f.kind != kindDocIdle || f.doc != "old" {
		t.Errorf("marker %d for %q, want the delivered document idle", f.kind, f.doc)
	}

	c := h.joinStored(link, "new")
	h.leave(c)
	h.expectOp(link, opIdle, "new")
	link.replies <- storeReply{doc: "new", owedNews: true, owed: true}
	for f := h.nextMarker(l); f.kind != kindDocActive; f = h.nextMarker(l) {
	}
	h.fromUpstream("new", step2)
	h.expectOp(link, opUpdate, "new")
}

// TestHubRepairsWhatTheStoreMissed checks that an operation that did not
// fit in the store's queue is counted and later made up for: the store is
// asked to fetch what it lacks from an editor of the document.
func TestHubRepairsWhatTheStoreMissed(t *testing.T) {
	link := newStoreLink()
	link.ops = make(chan storeOp, 4)
	h := startHub(t, nil, withStore(link))
	a := h.joinStored(link, "d")
	update := []byte{msgSync, syncUpdate, 2, 0, 0}
	for range cap(link.ops) + 2 {
		h.post(a, update)
	}
	h.barrier()
	if n := h.hub.drops.total(dropStoreBehind); n != 2 {
		t.Errorf("%d operations counted as not stored, want 2", n)
	}
	for range cap(link.ops) {
		h.nextOp(link)
	}
	h.post(a, update) // the next operation finds room: the repair goes first
	if op := h.nextOp(link); op.kind != opRepair || op.to != a {
		t.Errorf("got op %d to %p, want a repair asking the editor", op.kind, op.to)
	}
	h.expectOp(link, opUpdate, "d")
}

// TestSendQueueSegments checks an editor's send queue: it starts small,
// grows by doubling segments in a burst, goes back to a small segment once
// the writer has emptied a large one and ended, counts its limit in frames
// across segments, and hands every frame on in order, the end after the
// last. The test plays the writer, and says when it has ended.
func TestSendQueueSegments(t *testing.T) {
	tests := []struct {
		name                 string
		limit                int
		burst, taken         int
		writerEnded          bool // before more
		more                 int
		wantTail, wantRefuse int
	}{
		{"an idle editor's stays small", connQueue, 3, 3, true, 1, minSegment, 0},
		{"a burst doubles it", connQueue, 30, 0, false, 0, 4 * minSegment, 0},
		{"emptied, it is small again", connQueue, 30, 30, true, 1, minSegment, 0},
		{"emptied, but the writer runs on", connQueue, 30, 30, false, 1, 4 * minSegment, 0},
		{"not emptied, it stays", connQueue, 30, 29, true, 1, 4 * minSegment, 0},
		{"past the limit, frames are refused", 20, 25, 0, false, 0, 2 * minSegment, 5},
		{"frames taken make room", 20, 20, 5, false, 5, 20, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := testConn("d", tt.limit)
			next, refused := 0, 0
			push := func(n int) {
				for range n {
					if c.enqueue([]byte{byte(next)}) {
						next++
					} else {
						refused++
					}
				}
			}
			want := 0
			take := func(n int) {
				for range n {
					msg, got := c.take()
					if got != queueFrame || msg[0] != byte(want) {
						t.Fatalf("took % x (%d), want frame %d", msg, got, want)
					}
					want++
				}
			}
			push(tt.burst)
			take(tt.taken)
			if tt.writerEnded {
				c.writer.Store(writerIdle)
			}
			push(tt.more)
			c.writer.Store(writerRunning) // the test's writer again, for the end's wake
			if got := cap(c.tail.ch); got != tt.wantTail || refused != tt.wantRefuse {
				t.Errorf("last segment of %d, %d refused; want %d, %d", got, refused, tt.wantTail, tt.wantRefuse)
			}
			c.end(closeTryAgain)
			take(next - want)
			if _, got := c.take(); got != queueEnded || c.closeCode != closeTryAgain {
				t.Errorf("after the frames: %d, code %d; want the end, code %d", got, c.closeCode, closeTryAgain)
			}
		})
	}
}

// TestWriterWritesEverythingWoken runs an editor's on-demand writer
// against a socket pair while the test plays the hub (queueing frames in
// bursts) and the reader (asking for pongs and pings, which it writes
// itself when no writer runs) at once: every frame
// arrives, in order, pongs and pings among them, the close frame after
// the last; no wake is lost between a writer's last look and its end.
func TestWriterWritesEverythingWoken(t *testing.T) {
	server, client := net.Pipe()
	t.Cleanup(func() { server.Close(); client.Close() })
	c := testConn("d", connQueue)
	c.writer.Store(writerIdle) // a real writer this time
	c.peer = makePeer(discard, keepalive{})
	c.nc, c.raw = server, server
	c.live = newLiveness(server, 0, 0)
	c.wake = c.nudgeWriter
	c.w = pumpState{p: &c.peer}

	const frames = 2000
	arrived := make(chan int, frames) // each data frame's number, as it arrives
	summary := make(chan string, 1)   // what went wrong on the client's side; "" for nothing
	go func() { summary <- readWriterOutput(bufio.NewReader(client), arrived, frames) }()
	readerDone := make(chan struct{})
	go func() { // the reader's part, while the hub queues: it writes itself when no writer runs
		defer close(readerDone)
		for i := range 200 {
			answerLatest(c.pongs, []byte{byte(i)})
			c.nudgeWriter()
			if i%10 == 0 {
				c.live.pingWanted.Store(true)
				c.nudgeWriter()
			}
		}
	}()
	timeout := time.After(testTimeout)
	seen := 0
	wait := func(upTo int) { // until frames up to upTo have arrived
		for ; seen < upTo; seen++ {
			select {
			case <-arrived:
			case <-timeout:
				t.Fatalf("%d frames arrived, want %d: a wake was lost", seen, upTo)
			}
		}
	}
	// Bursts of 1 to 40 frames, each as soon as the last one's final frame
	// has arrived, that is when the writer is about to look for more and
	// end: a burst whose wake that writer missed would never arrive.
	for sent := 0; sent < frames; {
		for range min(1+sent%40, frames-sent) {
			if !c.push(binary.BigEndian.AppendUint32(nil, uint32(sent))) {
				t.Fatalf("frame %d refused", sent)
			}
			sent++
		}
		wait(sent)
	}
	<-readerDone
	c.end(closeNormal)
	select {
	case problem := <-summary:
		if problem != "" {
			t.Error(problem)
		}
	case <-timeout:
		t.Fatal("no close frame")
	}
	<-c.done
}

// readWriterOutput reads server frames from br until the close frame and
// says what is wrong with them: the data frames must number 0 to frames-1
// in order (each number also goes to arrived), and pongs and pings must
// be among them.
func readWriterOutput(br *bufio.Reader, arrived chan<- int, frames int) string {
	want, pongs, pings := 0, 0, 0
	for {
		h, payload, err := readServerFrame(br)
		if err != nil {
			return fmt.Sprintf("after %d frames: %v", want, err)
		}
		switch h.opcode {
		case opBinary:
			if n := int(binary.BigEndian.Uint32(payload)); n != want {
				return fmt.Sprintf("frame %d arrived as number %d", n, want)
			}
			arrived <- want
			want++
		case opPong:
			pongs++
		case opPing:
			pings++
		case opClose:
			if want != frames || pongs == 0 || pings == 0 {
				return fmt.Sprintf("closed after %d frames, %d pongs, %d pings; want %d frames and some of each", want, pongs, pings, frames)
			}
			return ""
		}
	}
}

// readServerFrame reads one unmasked frame.
func readServerFrame(br *bufio.Reader) (frameHeader, []byte, error) {
	first, err := br.Peek(2)
	if err != nil {
		return frameHeader{}, nil, err
	}
	hdr := make([]byte, frameHeaderLen(first[1]))
	if _, err := io.ReadFull(br, hdr); err != nil {
		return frameHeader{}, nil, err
	}
	h, err := parseFrameHeader(hdr)
	if err != nil {
		return h, nil, err
	}
	payload := make([]byte, h.size)
	_, err = io.ReadFull(br, payload)
	return h, payload, err
}
