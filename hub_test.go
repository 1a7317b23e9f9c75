package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// The hub is tested in memory: conns are bare send queues without a
// socket, and the tests play their readers by sending to h.local. Each
// join is an unbuffered send, so the hub has added the conn before the
// test goes on; frames on h.local are handled in order, so a frame that
// arrives proves that every earlier frame has been routed.

// startHub runs a hub until the test ends.
func startHub(t *testing.T) (*hub, context.CancelFunc) {
	t.Helper()
	h := newHub(connQueue, defaultMaxMessage, keepalive{}, limits{}, discard)
	ctx, cancel := context.WithCancel(context.Background())
	go h.run(ctx)
	t.Cleanup(func() {
		cancel()
		<-h.quit
	})
	return h, cancel
}

// memConn joins a socketless conn with a queue of size queue to doc. At
// the end of the test its reader leaves, as a real one always does.
func memConn(t *testing.T, h *hub, doc string, queue int) *conn {
	t.Helper()
	if err := h.admit(doc); err != nil {
		t.Fatalf("admit: %v", err)
	}
	c := &conn{peer: peer{log: discard}, doc: doc, remote: "mem", send: make(chan []byte, queue)}
	h.join <- c
	t.Cleanup(func() { leave(h, c) })
	expect(t, c, emptyStep1) // every newcomer is asked for its document
	return c
}

// leave plays the end of c's reader and handler.
func leave(h *hub, c *conn) {
	select {
	case h.leave <- departure{c, closeNormal}:
	case <-h.quit:
		return
	}
	h.release(c.doc)
}

// twoEditors joins two editors to doc and consumes the query-awareness
// that the second one's arrival sends the first.
func twoEditors(t *testing.T, h *hub, doc string) (a, b *conn) {
	t.Helper()
	a = memConn(t, h, doc, connQueue)
	b = memConn(t, h, doc, connQueue)
	expect(t, a, queryAwareness)
	return a, b
}

// memLink attaches a socketless upstream link with a queue of size queue.
func memLink(h *hub, queue int) *link {
	l := &link{send: make(chan frame, queue)}
	h.attach <- l
	return l
}

// post plays c's reader: it hands msg to the hub.
func post(t *testing.T, h *hub, c *conn, msg []byte) {
	t.Helper()
	kind, err := messageKind(msg)
	if err != nil {
		t.Fatalf("test message % x: %v", msg, err)
	}
	h.local <- frame{doc: c.doc, data: msg, kind: kind, from: c}
}

// next returns the next message queued for c.
func next(t *testing.T, c *conn) []byte {
	t.Helper()
	select {
	case msg, ok := <-c.send:
		if !ok {
			t.Fatalf("conn on %s was closed (code %d)", c.doc, c.closeCode)
		}
		return msg
	case <-time.After(testTimeout):
		t.Fatalf("nothing queued for conn on %s", c.doc)
		return nil
	}
}

// expect fails unless c's next message is want.
func expect(t *testing.T, c *conn, want []byte) {
	t.Helper()
	if got := next(t, c); !bytes.Equal(got, want) {
		t.Fatalf("conn on %s got % x, want % x", c.doc, got, want)
	}
}

// expectEmpty fails if anything is queued for c.
func expectEmpty(t *testing.T, c *conn) {
	t.Helper()
	select {
	case msg := <-c.send:
		t.Fatalf("conn on %s got % x, want nothing", c.doc, msg)
	default:
	}
}

// expectClosed fails unless c's queue is closed, after draining it, with code.
func expectClosed(t *testing.T, c *conn, code int) {
	t.Helper()
	for {
		select {
		case _, ok := <-c.send:
			if ok {
				continue
			}
			if c.closeCode != code {
				t.Fatalf("closed with %d, want %d", c.closeCode, code)
			}
			return
		case <-time.After(testTimeout):
			t.Fatal("conn was not closed")
		}
	}
}

func TestHubSyncGoesToOthersNotBackToSender(t *testing.T) {
	h, _ := startHub(t)
	up := memLink(h, upstreamQueue)
	a := memConn(t, h, "d1", connQueue)
	b := memConn(t, h, "d1", connQueue)
	expect(t, a, queryAwareness) // b's arrival
	other := memConn(t, h, "d2", connQueue)

	post(t, h, a, update1)
	expect(t, b, update1)
	if f := <-up.send; f.doc != "d1" || !bytes.Equal(f.data, update1) {
		t.Errorf("upstream got %q % x, want d1 % x", f.doc, f.data, update1)
	}
	post(t, h, b, update2) // a barrier: routed after update1
	expect(t, a, update2)  // a never got its own update1
	expectEmpty(t, b)
	expectEmpty(t, other)
}

func TestHubAwarenessEchoesToSender(t *testing.T) {
	h, _ := startHub(t)
	a, b := twoEditors(t, h, "d1")
	post(t, h, a, awareness)
	expect(t, a, awareness)
	expect(t, b, awareness)
}

func TestHubLoneEditorHearsItsAwareness(t *testing.T) {
	h, _ := startHub(t)
	a := memConn(t, h, "d1", connQueue)
	post(t, h, a, step1)
	post(t, h, a, awareness)
	expect(t, a, awareness) // and not its step 1
}

func TestHubQueriesAwarenessOnJoin(t *testing.T) {
	h, _ := startHub(t)
	a, b := twoEditors(t, h, "d1")
	c := memConn(t, h, "d1", connQueue)
	expect(t, a, queryAwareness)
	expect(t, b, queryAwareness)
	post(t, h, c, update1)
	expect(t, a, update1) // nothing was queued for c at its own join
	expect(t, b, update1)
	expectEmpty(t, c)
}

func TestHubIsolatesDocuments(t *testing.T) {
	h, _ := startHub(t)
	a := memConn(t, h, "d1", connQueue)
	b := memConn(t, h, "d2", connQueue)
	post(t, h, a, update1)
	post(t, h, b, awareness)
	expect(t, b, awareness) // b's echo, after a's update was routed
	expectEmpty(t, b)
	expectEmpty(t, a)
}

func TestHubUpstreamFramesReachEveryLocalEditor(t *testing.T) {
	h, _ := startHub(t)
	a, b := twoEditors(t, h, "d1")
	other := memConn(t, h, "d2", connQueue)
	h.remote <- frame{doc: "nobody-here", data: update2, kind: msgSync} // dropped
	h.remote <- frame{doc: "d1", data: update1, kind: msgSync}
	expect(t, a, update1)
	expect(t, b, update1)
	h.remote <- frame{doc: "d2", data: update2, kind: msgSync}
	expect(t, other, update2) // the only frame for d2
	expectEmpty(t, a)
}

func TestHubClosesSlowEditorWithoutStallingOthers(t *testing.T) {
	h, _ := startHub(t)
	up := memLink(h, upstreamQueue)
	a := memConn(t, h, "d1", connQueue)
	slow := memConn(t, h, "d1", 1)
	b := memConn(t, h, "d1", connQueue)
	const n = 50
	for i := range n {
		post(t, h, a, []byte{msgSync, syncUpdate, 1, byte(i)})
	}
	for i := range n {
		expect(t, b, []byte{msgSync, syncUpdate, 1, byte(i)})
		if f := <-up.send; f.data[3] != byte(i) {
			t.Fatalf("upstream got % x out of order", f.data)
		}
	}
	expectClosed(t, slow, closeTryAgain)
	// The slow conn's reader may still report its end: the hub ignores it.
	h.leave <- departure{slow, closeNormal}
	post(t, h, b, update1)
	expect(t, a, queryAwareness) // slow's arrival
	expect(t, a, queryAwareness) // b's arrival
	expect(t, a, update1)
}

func TestHubLeaveClosesConn(t *testing.T) {
	h, _ := startHub(t)
	a := memConn(t, h, "d1", connQueue)
	b := memConn(t, h, "d1", connQueue)
	h.leave <- departure{b, closeUnsupported}
	expectClosed(t, b, closeUnsupported)
	post(t, h, a, awareness)
	expect(t, a, queryAwareness)
	expect(t, a, awareness)
	// The document is gone once its last editor left.
	h.leave <- departure{a, closeNormal}
	expectClosed(t, a, closeNormal)
	h.remote <- frame{doc: "d1", data: update1, kind: msgSync}
	c := memConn(t, h, "d1", connQueue)
	post(t, h, c, awareness)
	expect(t, c, awareness) // not update1, which found no editor
}

func TestHubFullUpstreamQueueClosesLink(t *testing.T) {
	h, _ := startHub(t)
	up := memLink(h, 1)
	a := memConn(t, h, "d1", connQueue)
	post(t, h, a, update1)
	post(t, h, a, update2) // does not fit: the link is closed
	post(t, h, a, awareness)
	expect(t, a, awareness)
	if f, ok := <-up.send; !ok || !bytes.Equal(f.data, update1) {
		t.Fatalf("got % x, %v; want the queued update1", f.data, ok)
	}
	if _, ok := <-up.send; ok {
		t.Fatal("link still open after its queue filled")
	}
	// Local editing goes on, and a new link gets a resync, then new frames.
	next := memLink(h, upstreamQueue)
	post(t, h, a, update1)
	for _, want := range [][]byte{emptyStep1, update1} {
		if f := <-next.send; f.doc != "d1" || !bytes.Equal(f.data, want) {
			t.Errorf("new link got %s % x, want d1 % x", f.doc, f.data, want)
		}
	}
}

func TestHubDetachIgnoresOldLink(t *testing.T) {
	h, _ := startHub(t)
	old := memLink(h, upstreamQueue)
	current := memLink(h, upstreamQueue) // replaces and closes old
	if _, ok := <-old.send; ok {
		t.Fatal("old link still open")
	}
	h.detach <- old
	a := memConn(t, h, "d1", connQueue)
	post(t, h, a, update1)
	if f := <-current.send; !bytes.Equal(f.data, update1) {
		t.Errorf("got % x, want % x", f.data, update1)
	}
}

func TestHubStopClosesEverything(t *testing.T) {
	h, cancel := startHub(t)
	up := memLink(h, upstreamQueue)
	a := memConn(t, h, "d1", connQueue)
	b := memConn(t, h, "d2", connQueue)
	post(t, h, a, update1)
	cancel()
	expectClosed(t, a, closeGoingAway)
	expectClosed(t, b, closeGoingAway)
	// What a reader still delivers before it leaves goes upstream too.
	post(t, h, a, update2)
	leave(h, a)
	leave(h, b)
	<-h.quit
	for _, want := range [][]byte{update1, update2} {
		if f, ok := <-up.send; !ok || !bytes.Equal(f.data, want) {
			t.Errorf("got % x, %v; want % x before the close", f.data, ok, want)
		}
	}
	if _, ok := <-up.send; ok {
		t.Error("link still open after stop")
	}
}

// postAwareness plays c's reader for an awareness message.
func postAwareness(t *testing.T, h *hub, c *conn, msg []byte) {
	t.Helper()
	f, err := checkLocal(c, msg)
	if err != nil {
		t.Fatalf("test message % x: %v", msg, err)
	}
	h.local <- f
}

func TestHubResyncsEveryDocumentOnAttach(t *testing.T) {
	h, _ := startHub(t)
	a, b := twoEditors(t, h, "d1")
	c := memConn(t, h, "d2", connQueue)
	up := memLink(h, upstreamQueue)
	// Upstream: an empty step 1 for each document, which joins its room.
	got := map[string]bool{}
	for range 2 {
		f := <-up.send
		if !bytes.Equal(f.data, emptyStep1) {
			t.Fatalf("upstream got % x for %s, want the empty step 1", f.data, f.doc)
		}
		got[f.doc] = true
	}
	if !got["d1"] || !got["d2"] {
		t.Errorf("resynced %v, want d1 and d2", got)
	}
	// Locally: exactly one editor of each document is asked for its state
	// and its awareness.
	expect(t, c, emptyStep1)
	expect(t, c, queryAwareness)
	asked := 0
	for _, x := range []*conn{a, b} {
		select {
		case msg := <-x.send:
			if !bytes.Equal(msg, emptyStep1) {
				t.Fatalf("got % x, want the empty step 1", msg)
			}
			expect(t, x, queryAwareness)
			asked++
		default:
		}
	}
	if asked != 1 {
		t.Errorf("%d editors of d1 asked for their state, want 1", asked)
	}
	// The answer goes upstream like any local message.
	post(t, h, a, update1)
	if f := <-up.send; !bytes.Equal(f.data, update1) {
		t.Errorf("upstream got % x, want the answer % x", f.data, update1)
	}
}

func TestHubAsksAnotherEditorWhenTheAskedOneLeaves(t *testing.T) {
	h, _ := startHub(t)
	a, b := twoEditors(t, h, "d1")
	memLink(h, upstreamQueue)
	asked, other := a, b
	select {
	case <-b.send:
		asked, other = b, a
	case <-a.send:
	case <-time.After(testTimeout):
		t.Fatal("nobody was asked")
	}
	expect(t, asked, queryAwareness)
	leave(h, asked) // before it answered
	expect(t, other, emptyStep1)
	expect(t, other, queryAwareness)
	// Once the step 2 is in, a leaving editor causes no new question.
	c := memConn(t, h, "d1", connQueue)
	expect(t, other, queryAwareness) // c's arrival
	step2 := []byte{msgSync, syncStep2, 2, 0, 0}
	post(t, h, other, step2) // the answer to its join's step 1
	post(t, h, other, step2) // and to the resync's
	expect(t, c, step2)
	expect(t, c, step2)
	leave(h, other)
	post(t, h, c, awareness)
	expect(t, c, awareness) // no step 1 before it
}

// barrier returns once the hub has handled everything sent to it before:
// an admission is a round trip through its loop.
func barrier(t *testing.T, h *hub) {
	t.Helper()
	if err := h.admit("barrier"); err != nil {
		t.Fatal(err)
	}
	h.release("barrier")
}

// stuffed joins a conn whose queue of one is already full, as a slow
// editor's is.
func stuffed(t *testing.T, h *hub, doc string) *conn {
	t.Helper()
	c := memConn(t, h, doc, 1)
	c.send <- []byte{0xff} // a backlog the test never reads
	return c
}

func TestHubResyncSkipsAnEditorClosedAsSlow(t *testing.T) {
	h, _ := startHub(t)
	slow := stuffed(t, h, "d1")
	memLink(h, upstreamQueue) // asks slow, whose queue is full: closed, no panic
	barrier(t, h)
	<-slow.send
	expectClosed(t, slow, closeTryAgain)
	// The next editor of the document is asked in its place.
	b := memConn(t, h, "d1", connQueue)
	memLink(h, upstreamQueue)
	expect(t, b, emptyStep1)
	expect(t, b, queryAwareness)
}

func TestHubNewcomerSurvivesTheCloseOfASlowEditor(t *testing.T) {
	h, _ := startHub(t)
	slow := stuffed(t, h, "d1")
	b := memConn(t, h, "d1", connQueue) // its query closes slow, the only other editor
	barrier(t, h)
	<-slow.send
	expectClosed(t, slow, closeTryAgain)
	c := memConn(t, h, "d1", connQueue)
	expect(t, b, queryAwareness) // c's arrival: b is still in the document
	post(t, h, c, update1)
	expect(t, b, update1)
	leave(h, b)
	expectClosed(t, b, closeNormal)
}

func TestHubDropsAwarenessFromAClosedEditor(t *testing.T) {
	h, _ := startHub(t)
	a := memConn(t, h, "d1", connQueue)
	slow := memConn(t, h, "d1", 2)
	expect(t, a, queryAwareness)
	postAwareness(t, h, slow, awarenessMsg(5, 1, "{}"))
	expect(t, a, awarenessMsg(5, 1, "{}"))
	post(t, h, a, update1)
	post(t, h, a, update2) // closes slow
	expect(t, a, awarenessMsg(5, 2, "null"))
	// slow's reader still delivers a cursor move and an update.
	postAwareness(t, h, slow, awarenessMsg(5, 3, `{"cursor":1}`))
	post(t, h, slow, []byte{msgSync, syncUpdate, 1, 0x55})
	expect(t, a, []byte{msgSync, syncUpdate, 1, 0x55}) // the update, not the ghost
}

func TestHubRevivesAClientThatComesBack(t *testing.T) {
	h, _ := startHub(t)
	a, b := twoEditors(t, h, "d1")
	postAwareness(t, h, b, awarenessMsg(7, 4, "{}"))
	expect(t, a, awarenessMsg(7, 4, "{}"))
	leave(h, b)
	expect(t, a, awarenessMsg(7, 5, "null"))
	// The same client reconnects, announcing its old clock, which every
	// peer would ignore: the relay tells it it was gone at 5.
	back := memConn(t, h, "d1", connQueue)
	expect(t, a, queryAwareness)
	postAwareness(t, h, back, awarenessMsg(7, 4, "{}"))
	expect(t, back, awarenessMsg(7, 5, "null"))
	expect(t, back, awarenessMsg(7, 4, "{}")) // its echo
	// Its answer at clock 6 reaches everyone; nothing more is sent back.
	postAwareness(t, h, back, awarenessMsg(7, 6, "{}"))
	expect(t, a, awarenessMsg(7, 4, "{}"))
	expect(t, a, awarenessMsg(7, 6, "{}"))
	expect(t, back, awarenessMsg(7, 6, "{}"))
	expectEmpty(t, back)
}

func TestHubSendsRemovalsMadeWhileDownOnReconnect(t *testing.T) {
	h, _ := startHub(t)
	a, b := twoEditors(t, h, "d1")
	postAwareness(t, h, b, awarenessMsg(9, 2, "{}"))
	expect(t, a, awarenessMsg(9, 2, "{}"))
	leave(h, b) // the upstream is down
	expect(t, a, awarenessMsg(9, 3, "null"))
	up := memLink(h, upstreamQueue)
	expectUpstream(t, up, awarenessMsg(9, 3, "null"))
}

func TestHubResyncAnswerIsTheStep2ForItsOwnStep1(t *testing.T) {
	h, _ := startHub(t)
	a := memConn(t, h, "d1", connQueue)
	newcomer := memConn(t, h, "d1", connQueue)
	expect(t, a, queryAwareness)
	post(t, h, newcomer, step1) // a owes the newcomer a step 2
	expect(t, a, step1)
	leave(h, newcomer)
	memLink(h, upstreamQueue) // asks a, the only editor
	expect(t, a, emptyStep1)
	expect(t, a, queryAwareness)
	c := memConn(t, h, "d1", connQueue)
	expect(t, a, queryAwareness)
	post(t, h, a, []byte{msgSync, syncStep2, 2, 0, 0}) // answers the newcomer only
	leave(h, a)                                        // before it answered the resync
	expect(t, c, []byte{msgSync, syncStep2, 2, 0, 0})
	expect(t, c, emptyStep1) // so c is asked in its place
	expect(t, c, queryAwareness)
}

func TestHubMarksAwarenessGoneWhenEditorLeaves(t *testing.T) {
	h, _ := startHub(t)
	up := memLink(h, upstreamQueue)
	a, b := twoEditors(t, h, "d1")

	own := awarenessMsg(7, 3, `{"user":"a"}`, 8, 1, `{"user":"a2"}`)
	postAwareness(t, h, a, own)
	expect(t, a, own)
	expect(t, b, own)
	// b re-broadcasts a's state, as y-websocket clients do: it owns none of it.
	postAwareness(t, h, b, awarenessMsg(7, 3, `{"user":"a"}`))
	expect(t, a, awarenessMsg(7, 3, `{"user":"a"}`))
	expect(t, b, awarenessMsg(7, 3, `{"user":"a"}`))
	// A remote client, announced by the upstream.
	remote := awarenessMsg(99, 5, `{"user":"r"}`)
	h.remote <- frame{doc: "d1", data: remote, kind: msgAwareness, aware: mustAwareness(t, remote)}
	expect(t, a, remote)
	expect(t, b, remote)

	leave(h, a)
	expectClosed(t, a, closeNormal)
	got := next(t, b)
	entries := mustAwareness(t, got)
	slices.SortFunc(entries, func(x, y awarenessEntry) int { return int(x.client) - int(y.client) })
	if want := []awarenessEntry{{7, 4, true}, {8, 2, true}}; !slices.Equal(entries, want) {
		t.Errorf("b got %v, want %v", entries, want)
	}
	expectUpstream(t, up, got) // the upstream hears of it too
	// b leaving marks nothing gone: it owns no client.
	c := memConn(t, h, "d1", connQueue)
	leave(h, b)
	expectClosed(t, b, closeNormal)
	postAwareness(t, h, c, awarenessMsg(1, 1, "{}"))
	expect(t, c, awarenessMsg(1, 1, "{}"))
}

func TestHubMarksAwarenessGoneForSlowEditor(t *testing.T) {
	h, _ := startHub(t)
	a := memConn(t, h, "d1", connQueue)
	slow := memConn(t, h, "d1", 2)
	expect(t, a, queryAwareness)
	postAwareness(t, h, slow, awarenessMsg(5, 1, "{}"))
	expect(t, a, awarenessMsg(5, 1, "{}"))
	post(t, h, a, update1) // slow's queue: its own echo, update1
	post(t, h, a, update2) // full: slow is closed
	post(t, h, a, awareness)
	expect(t, a, awarenessMsg(5, 2, "null")) // slow's client is gone
	expect(t, a, awareness)                  // all three routed
	expectClosed(t, slow, closeTryAgain)
}

func TestHubAwarenessClocks(t *testing.T) {
	h, _ := startHub(t)
	a, b := twoEditors(t, h, "d1")
	postAwareness(t, h, a, awarenessMsg(7, 3, "{}"))
	expect(t, b, awarenessMsg(7, 3, "{}"))
	// b announces a newer clock for 7 first: now b owns it (say, a client
	// that moved from a to b).
	postAwareness(t, h, b, awarenessMsg(7, 4, "{}"))
	expect(t, b, awarenessMsg(7, 4, "{}"))
	// An old clock from a changes nothing.
	postAwareness(t, h, a, awarenessMsg(7, 2, "{}"))
	expect(t, b, awarenessMsg(7, 2, "{}"))
	leave(h, a)
	expectClosed(t, a, closeNormal)
	postAwareness(t, h, b, awarenessMsg(1, 1, "{}"))
	expect(t, b, awarenessMsg(1, 1, "{}")) // no goodbye for 7 came first
	// A null at the current clock forgets the client: b's leaving says nothing.
	c := memConn(t, h, "d1", connQueue)
	expect(t, b, queryAwareness)
	postAwareness(t, h, b, awarenessMsg(7, 4, "null"))
	expect(t, c, awarenessMsg(7, 4, "null"))
	leave(h, b)
	expectClosed(t, b, closeNormal)
	expect(t, c, awarenessMsg(1, 2, "null")) // only client 1
}

// expectUpstream reads l's queue until it finds want.
func expectUpstream(t *testing.T, l *link, want []byte) {
	t.Helper()
	deadline := time.After(testTimeout)
	for {
		select {
		case f := <-l.send:
			if bytes.Equal(f.data, want) {
				return
			}
		case <-deadline:
			t.Fatalf("upstream never got % x", want)
		}
	}
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

func TestThrottle(t *testing.T) {
	var th throttle
	start := time.Now()
	if n, ok := th.hit(start); !ok || n != 1 {
		t.Fatalf("first hit: %d, %v; want 1, true", n, ok)
	}
	for i := range 5 {
		if _, ok := th.hit(start.Add(time.Duration(i) * time.Second)); ok {
			t.Fatalf("hit %d within warnEvery logged", i)
		}
	}
	if n, ok := th.hit(start.Add(warnEvery)); !ok || n != 6 {
		t.Fatalf("after warnEvery: %d, %v; want 6, true", n, ok)
	}
}

// BenchmarkHubRoute measures the hub alone: one local update routed to
// benchEditors other editors and the upstream queue, all drained.
func BenchmarkHubRoute(b *testing.B) {
	h := newHub(connQueue, defaultMaxMessage, keepalive{}, limits{}, discard)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go h.run(ctx)
	up := &link{send: make(chan frame, upstreamQueue)}
	h.attach <- up
	sender := &conn{peer: peer{log: discard}, doc: "d", send: make(chan []byte, connQueue)}
	h.join <- sender
	var drained sync.WaitGroup
	drain := func(n int, ch func() bool) {
		defer drained.Done()
		for range n {
			ch()
		}
	}
	var conns []*conn
	for range benchEditors {
		c := &conn{peer: peer{log: discard}, doc: "d", send: make(chan []byte, connQueue)}
		h.join <- c
		conns = append(conns, c)
	}
	msg := []byte{msgSync, syncUpdate, 4, 1, 2, 3, 4}
	b.ReportAllocs()
	b.ResetTimer()
	drained.Add(len(conns) + 1)
	for _, c := range conns {
		go drain(b.N, func() bool { <-c.send; return true })
	}
	go drain(b.N, func() bool { <-up.send; return true })
	go drain(len(conns), func() bool { <-sender.send; return true }) // the join queries
	drained.Add(1)
	for range b.N {
		h.local <- frame{doc: "d", data: msg, kind: msgSync, from: sender}
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
// editor sends 64-byte updates, benchEditors others receive each of them,
// and each goes upstream to an in-test ELVA server; at most benchWindow
// messages are in flight. With ELVA_BENCH_ADDR set, the same load goes to
// that address instead, for example to ../shared/bench/rawrelay.
func BenchmarkRelayFanOut(b *testing.B) {
	addr := os.Getenv("ELVA_BENCH_ADDR")
	if addr == "" {
		srv := newELVAServer(b, magicSeed)
		srv.frames = nil
		r := startRelay(b, "--server", srv.url())
		r.logs.waitFor(b, "upstream connected")
		addr = r.addr
	}
	doc := fmt.Sprintf("bench-%d", b.N)
	sender := dialLocal(b, addr, doc)
	var receivers []*websocket.Conn
	for range benchEditors {
		receivers = append(receivers, dialLocal(b, addr, doc))
	}
	warmUp(b, sender, receivers)
	msg := append([]byte{msgSync, syncUpdate, 62}, bytes.Repeat([]byte{7}, 62)...)
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	b.ResetTimer()
	progress := make(chan error, benchEditors*(b.N/benchWindow+2))
	for _, ws := range receivers {
		go receiveCounting(ws, len(msg), b.N, progress)
	}
	for sent := 0; sent < b.N; {
		batch := min(benchWindow, b.N-sent)
		for range batch {
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

// warmUp returns once every receiver has heard the sender: a relay may
// register a connection a little after its handshake. It works with any
// relay, ours or rawrelay, as it needs no echo.
func warmUp(b *testing.B, sender *websocket.Conn, receivers []*websocket.Conn) {
	b.Helper()
	hello := []byte{msgSync, syncUpdate, 1, 0}
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

// receiveCounting reads n messages of size bytes from ws and reports on
// progress after every benchWindow of them and after the last.
func receiveCounting(ws *websocket.Conn, size, n int, progress chan<- error) {
	ws.SetReadDeadline(time.Now().Add(time.Minute))
	for got := 0; got < n; {
		var m []byte
		if err := websocket.Message.Receive(ws, &m); err != nil {
			progress <- err
			return
		}
		if len(m) != size {
			continue // awareness noise from the joins
		}
		got++
		if got%benchWindow == 0 || got == n {
			progress <- nil
		}
	}
}

func TestHubClosesEditorOverItsByteBudget(t *testing.T) {
	h, _ := startHub(t)
	a := memConn(t, h, "d1", connQueue)
	b := memConn(t, h, "d1", connQueue) // reads nothing
	expect(t, a, queryAwareness)
	big := make([]byte, h.connBytes/2+1) // two do not fit, however few frames
	big[0], big[1] = msgSync, syncUpdate
	h.local <- frame{doc: "d1", data: big, kind: msgSync, from: a}
	h.local <- frame{doc: "d1", data: big, kind: msgSync, from: a}
	post(t, h, a, awareness)
	expect(t, a, awareness)           // both routed
	expectClosed(t, b, closeTryAgain) // with one frame queued of 256
}

func TestHubNoGhostWhenReviveClosesItsEditor(t *testing.T) {
	h, _ := startHub(t)
	a, b := twoEditors(t, h, "d1")
	postAwareness(t, h, b, awarenessMsg(7, 4, "{}"))
	expect(t, a, awarenessMsg(7, 4, "{}"))
	leave(h, b)
	expect(t, a, awarenessMsg(7, 5, "null"))
	back := stuffed(t, h, "d1") // full: the revive closes it
	expect(t, a, queryAwareness)
	postAwareness(t, h, back, awarenessMsg(7, 4, "{}", 8, 1, `{"cursor":1}`))
	barrier(t, h)
	<-back.send
	expectClosed(t, back, closeTryAgain)
	// Neither client 7 nor 8 reached a, so no goodbye is owed either.
	post(t, h, a, awareness)
	expect(t, a, awareness)
}

func TestHubRemovalsKeptWhileDownAreOnePerClient(t *testing.T) {
	h, _ := startHub(t)
	memConn(t, h, "d1", connQueue) // keeps the document open
	for i := range 1100 {          // one client that flaps while the upstream is down
		b := memConn(t, h, "d1", connQueue)
		postAwareness(t, h, b, awarenessMsg(9, 2*i+2, "{}"))
		expect(t, b, awarenessMsg(9, 2*i+2, "{}"))
		leave(h, b)
	}
	up := memLink(h, upstreamQueue)
	expectUpstream(t, up, awarenessMsg(9, 2*1099+3, "null")) // its last clock only
}

func TestHubGoodbyesAtStopDoNotCloseTheLink(t *testing.T) {
	h, cancel := startHub(t)
	up := memLink(h, 2)
	a := memConn(t, h, "d1", connQueue)
	postAwareness(t, h, a, awarenessMsg(5, 1, "{}")) // queue: 1 of 2
	post(t, h, a, update1)                           // queue: 2 of 2
	barrier(t, h)
	cancel() // a's goodbye does not fit
	expectClosed(t, a, closeGoingAway)
	got := make(chan [][]byte)
	go func() { // the upstream writer drains the queue meanwhile
		var frames [][]byte
		for f := range up.send {
			frames = append(frames, f.data)
		}
		got <- frames
	}()
	post(t, h, a, update2) // the reader still delivers
	leave(h, a)
	<-h.quit
	frames := <-got
	if !slices.ContainsFunc(frames, func(b []byte) bool { return bytes.Equal(b, update2) }) {
		t.Errorf("update2, accepted during the stop, never reached the upstream: % x", frames)
	}
}

// loggingHub runs a hub that logs into a buffer, set up by configure
// before it starts, until the test ends.
func loggingHub(t *testing.T, configure func(*hub)) (*hub, *logBuffer, context.CancelFunc) {
	t.Helper()
	logs := newLogBuffer()
	h := newHub(connQueue, defaultMaxMessage, keepalive{}, limits{}, slog.New(slog.NewTextHandler(logs, nil)))
	configure(h)
	ctx, cancel := context.WithCancel(context.Background())
	go h.run(ctx)
	t.Cleanup(func() {
		cancel()
		<-h.quit
	})
	return h, logs, cancel
}

// TestHubAsksANewcomerForItsDocument checks that a joining editor gets a
// step 1, as a Yjs server sends one, so that what it made while
// disconnected reaches the editors already there, with no upstream.
func TestHubAsksANewcomerForItsDocument(t *testing.T) {
	h, _ := startHub(t)
	a := memConn(t, h, "d1", connQueue)
	b := memConn(t, h, "d1", connQueue) // memConn checks b's step 1
	expect(t, a, queryAwareness)
	offline := []byte{msgSync, syncStep2, 2, 0xb1, 0}
	post(t, h, b, offline)
	expect(t, a, offline)
}

// TestHubIntroducesNewcomersFromOtherRelays checks that a client new to
// the relay, announced by the upstream, makes the relay ask one local
// editor for the states it knows, which then go upstream: an editor on
// another relay sees this relay's editors at once, not at their renewal.
func TestHubIntroducesNewcomersFromOtherRelays(t *testing.T) {
	h, _ := startHub(t)
	a := memConn(t, h, "d1", connQueue)
	up := memLink(h, upstreamQueue)
	expect(t, a, emptyStep1) // the resync
	expect(t, a, queryAwareness)
	expectUpstream(t, up, emptyStep1)
	fromUpstream := func(msg []byte) {
		h.remote <- frame{doc: "d1", data: msg, kind: msgAwareness, aware: mustAwareness(t, msg)}
	}
	fromUpstream(awarenessMsg(42, 1, "{}"))
	expect(t, a, awarenessMsg(42, 1, "{}"))
	expect(t, a, queryAwareness)
	// A known client's renewal, and another newcomer within a second,
	// cause no second question.
	fromUpstream(awarenessMsg(42, 2, "{}"))
	fromUpstream(awarenessMsg(43, 1, "{}"))
	expect(t, a, awarenessMsg(42, 2, "{}"))
	expect(t, a, awarenessMsg(43, 1, "{}"))
	postAwareness(t, h, a, awareness)
	expect(t, a, awareness)
}

// TestHubAsksNobodyWhileTheUpstreamIsDown checks that when the editor
// asked for its document leaves while the upstream is down, nobody else
// is asked: the answer could go nowhere, and the reconnect asks anyway.
func TestHubAsksNobodyWhileTheUpstreamIsDown(t *testing.T) {
	h, _ := startHub(t)
	a, b := twoEditors(t, h, "d1")
	up := memLink(h, upstreamQueue)
	asked, other := a, b
	select {
	case <-b.send:
		asked, other = b, a
	case <-a.send:
	case <-time.After(testTimeout):
		t.Fatal("nobody was asked")
	}
	expect(t, asked, queryAwareness)
	h.detach <- up
	leave(h, asked)
	postAwareness(t, h, other, awareness)
	expect(t, other, awareness) // no step 1 before it
}

// TestHubNeverSendsTheUpstreamMoreThanItsLimit checks that a message over
// --upstream-max-message reaches the local editors but not the upstream,
// that its document is named once, and that later messages that fit go.
func TestHubNeverSendsTheUpstreamMoreThanItsLimit(t *testing.T) {
	h, logs, _ := loggingHub(t, func(h *hub) { h.upstreamMax = 100 })
	up := memLink(h, upstreamQueue)
	a, b := twoEditors(t, h, "big")
	tooBig := updateMsg(make([]byte, 100))
	post(t, h, a, tooBig)
	post(t, h, a, tooBig)
	expect(t, b, tooBig)
	expect(t, b, tooBig)
	post(t, h, a, update1)
	expectUpstream(t, up, update1)
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
	h, logs, cancel := loggingHub(t, func(h *hub) { h.stopWait = 50 * time.Millisecond })
	up := memLink(h, 1)
	a := memConn(t, h, "d1", connQueue)
	post(t, h, a, update1) // fills the upstream queue
	barrier(t, h)
	cancel()
	expectClosed(t, a, closeGoingAway)
	post(t, h, a, update2) // finds no room in time
	logs.waitFor(t, "not flushed")
	expectUpstream(t, up, update1) // room again
	update3 := []byte{msgSync, syncUpdate, 1, 0xa3}
	post(t, h, a, update3)
	leave(h, a)
	<-h.quit
	for f := range up.send {
		t.Errorf("% x went upstream after update2 was dropped", f.data)
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
	h, _, cancel := loggingHub(t, func(h *hub) {
		h.after = func(time.Duration) <-chan time.Time { return sweep }
	})
	for i := range 1100 { // more documents than the old per-document cap
		doc := fmt.Sprintf("d%d", i)
		c := memConn(t, h, doc, connQueue)
		postAwareness(t, h, c, awarenessMsg(i+1, 1, "{}"))
		expect(t, c, awarenessMsg(i+1, 1, "{}"))
		leave(h, c)
	}
	up := memLink(h, upstreamQueue*2)
	barrier(t, h)
	owed := 0
	for len(up.send) > 0 {
		if f := <-up.send; f.kind == msgAwareness {
			owed++
		}
	}
	if owed != 1100 {
		t.Errorf("%d removals sent on reconnect, want 1100 (none dropped wholesale)", owed)
	}
	sweep <- time.Now().Add(goneTTL)
	barrier(t, h)
	cancel()
	<-h.quit // the hub's fields are the test's now
	if n := h.gone.len(); n != 0 || h.gone.entries != nil {
		t.Errorf("%d gone clients remembered after their TTL, want none", n)
	}
}
