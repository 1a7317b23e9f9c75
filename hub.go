package main

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"maps"
	"math"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/websocket"
)

const (
	// connQueue frames may wait for one editor before the hub closes it as a
	// slow consumer. Its client reconnects and resyncs; a skipped frame would
	// instead leave a gap that stalls every later update behind it.
	connQueue = 256
	// inboxQueue absorbs bursts from all readers on their way into the hub.
	inboxQueue = 1024
	// closeGrace is how long a closing conn waits for the peer's close frame
	// before it drops the TCP connection.
	closeGrace = time.Second
	// warnEvery is the least time between two log lines of one repeated kind.
	warnEvery = 10 * time.Second
	// maxTrackedClients bounds the awareness clients the hub remembers per
	// document; past it, clients announced by the upstream are forgotten
	// first, then new ones are not tracked.
	maxTrackedClients = 4096
)

// writeWait bounds one write to a peer; a peer that takes longer is dead or
// too slow to keep, and its conn is closed. A variable for one test only.
var writeWait = 10 * time.Second

// queryAwareness asks a Yjs client for every awareness state it knows. The
// slice is shared by every queue it is put on and never modified.
var queryAwareness = []byte{msgQueryAwareness}

// Marker frames carry no message but tell the upstream that a document
// has local editors now (kindDocActive) or none any more (kindDocIdle):
// a mode with one connection per document opens and closes it by them.
// Their kinds lie beyond every Yjs message type; framings send nothing
// for them.
const (
	kindDocActive = math.MaxUint64 - 1
	kindDocIdle   = math.MaxUint64
)

// isMarker reports whether f is a marker frame.
func isMarker(f frame) bool { return f.kind >= kindDocActive }

// frame is one Yjs message on its way through the hub. data is never
// modified once a reader has handed it on, so the hub shares it between all
// recipients without copying.
type frame struct {
	doc   string
	data  []byte
	kind  uint64           // Yjs message type, checked by the reader
	from  *conn            // local sender; nil for frames from the upstream
	aware []awarenessEntry // decoded by the reader for awareness messages
}

// conn is one local editor's WebSocket. Its reader goroutine (serve,
// readLoop) reads it; a writer goroutine exists only while something waits
// to be written (wakeWriter); the hub owns membership and alone ends the
// send queue. An idle editor thus holds one goroutine, a small queue and
// no buffer.
type conn struct {
	peer // the socket; log carries doc and remote

	// Static after construction.
	doc     string
	remote  string
	limit   int          // frames the send queue may hold (connQueue)
	backlog backlog      // bytes in the send queue: added by the hub, done by the writer
	queued  atomic.Int32 // frames in the send queue: added by the hub, taken by the writer

	// Owned by the hub.
	tail *segment // the send queue's segment that the hub fills
	// Sync step 1s queued to this editor and step 2s it sent. A Yjs client
	// answers every step 1 with one step 2, in order, so the counts tell
	// when it has answered a given step 1.
	step1s, step2s int
	// traffic is its document's counters (set by addEditor), owned by the
	// hub.
	traffic *traffic

	// writer is idle, running or asked to look again (wakeWriter).
	writer atomic.Int32
	// Owned by the writer goroutine; one runs at a time (see wakeWriter).
	head *segment  // the send queue's segment the writer takes from; nil after its end
	w    pumpState // what the writer knows of the socket

	// Owned by the reader goroutine.
	in wireReader
}

// segment is one piece of an editor's send queue: a buffered channel that
// the hub fills and the writer drains. The queue is a chain of them
// rather than one channel of connQueue slots (6 KiB each, allocated up
// front): it starts with minSegment slots, a full segment is followed by
// one twice its size, and once the writer has emptied an oversized one the
// hub goes back to minSegment (push). Closing ch hands the writer on to
// next; closing it with next nil ends the queue.
type segment struct {
	ch   chan []byte
	next *segment // written by the hub before it closes ch
}

// minSegment is the size of an editor's first send segment, in frames:
// enough for what an editor gets at once when it joins (a step 1,
// queries as others join) without growing.
const minSegment = 8

// keepalive says how the relay finds dead peers: a ping goes out every
// interval (an editor's when its read deadline says so, the upstream's
// from its writer's ticker), and the reader closes a peer that sent no
// frame at all (data, ping, pong) for timeout. TCP alone never tells a half-open connection,
// whose peer vanished without a FIN, from a quiet one.
type keepalive struct {
	interval time.Duration // 0: no pings
	timeout  time.Duration // 0: wait for ever
}

// leaving tells the hub that an editor's reader has ended, and the close
// code to answer with.
type leaving struct {
	c    *conn
	code int
}

// hub routes frames between the local editors of each document and the
// upstream. Readers send to it; it never blocks on a send of its own but
// at the stop, when it waits (bounded) for room in the upstream queue.
type hub struct {
	// Static after construction.
	admission   chan admitRequest // a local request asks for room before its upgrade
	released    chan string       // an admitted request's upgrade failed or its connection ended
	join        chan *conn        // an upgraded editor
	leave       chan leaving      // an editor's reader has ended
	fromEditors chan frame        // from editors' readers
	fromServer  chan frame        // from the upstream's readers
	// upstream carries the upstream side's news: a connection's link up or
	// down, a document to resync. One channel for the three keeps the
	// loop's select, which locks every channel it waits on, small.
	upstream chan upstreamEvent
	// queries asks the hub for a snapshot for the status page and the
	// metrics: each carries the channel (room for one) it is answered on.
	queries    chan chan<- hubStatus
	quit       chan struct{} // closed when run returns
	connQueue  int           // frames an editor's send queue holds
	maxMessage int           // the largest message from an editor, in bytes
	connBytes  int64         // byte budget of an editor's send queue
	linkBytes  int64         // byte budget of the upstream send queue
	// upstreamMax is the largest frame the upstream server takes, in bytes,
	// with the link's own overhead (--upstream-max-message); 0: no limit.
	upstreamMax int
	// stopWait bounds the hub's part of a stop; 0: hubStopTimeout.
	stopWait time.Duration
	// after makes the sweep's timer channels: time.After, or a test's.
	after     func(time.Duration) <-chan time.Time
	keepalive keepalive
	limits    limits
	log       *slog.Logger
	drops     *drops // shared by every goroutine of the relay
	// store is the local document store's queue; nil: --no-store.
	store        *storeLink
	storeReplies chan storeReply // store.replies; nil without a store
	// standalone: no server at all; nothing goes upstream.
	standalone bool

	// Owned by run.
	docs     map[string]*document
	up       *upstreamLink  // nil while the upstream is down
	handlers int            // admitted requests whose upgrade or connection has not ended
	perDoc   map[string]int // the same, per document
	gone     goneTable      // awareness clients marked gone, for 30 s
	sweep    <-chan time.Time
	removals []frame // awareness removals waiting to be routed
	// cut lists the documents of which a sync message could not go
	// upstream (too large, or not flushed at the stop): nothing later of
	// them goes until the next connection's resync, so that the server
	// never sees update n+1 without update n.
	cut         map[string]bool
	tooBigNamed map[string]bool // documents named in a too-large warning; bounded
	// held lists the documents without local editors that the store
	// says owe the server edits: they stay open upstream until delivered.
	held map[string]bool
	// storeGaps lists the documents of which an operation did not fit in
	// the store's queue: the store is asked for a repair once it has room.
	storeGaps map[string]bool
	// linkGen numbers each document's current upstream connection (its
	// last opLinkUp); store replies for another one are stale and dropped.
	// linkGaps lists the documents whose opLinkUp did not fit in the
	// store's queue: until it does, the store gets none of their upstream
	// messages. syncs counts the opLinkUps.
	linkGen  map[string]uint64
	linkGaps map[string]bool
	syncs    uint64
	// editorTraffic and serverTraffic count every message from and to
	// the local editors and the server, in all: the metrics' counters,
	// which must not go down when a document closes.
	editorTraffic, serverTraffic traffic
	// The stop is a mode of run: stopping from the first cancel, until
	// every handler has returned or stopBy has passed (stopTimer).
	stopping  bool
	stopBy    time.Time
	stopTimer <-chan time.Time
}

// newHub returns a hub whose editors queue up to queue frames and whose
// readers accept messages of up to maxMessage bytes.
func newHub(queue, maxMessage int, ka keepalive, lim limits, log *slog.Logger) *hub {
	return &hub{
		admission:   make(chan admitRequest),
		released:    make(chan string),
		join:        make(chan *conn),
		leave:       make(chan leaving),
		fromEditors: make(chan frame, inboxQueue),
		fromServer:  make(chan frame, inboxQueue),
		upstream:    make(chan upstreamEvent),
		queries:     make(chan chan<- hubStatus),
		quit:        make(chan struct{}),
		connQueue:   queue,
		maxMessage:  maxMessage,
		connBytes:   queueBytes(maxMessage),
		linkBytes:   4 * queueBytes(maxMessage),
		after:       time.After,
		keepalive:   ka,
		limits:      lim,
		log:         log,
		drops:       &drops{},
		docs:        make(map[string]*document),
		perDoc:      make(map[string]int),
		cut:         make(map[string]bool),
		tooBigNamed: make(map[string]bool),
		held:        make(map[string]bool),
		storeGaps:   make(map[string]bool),
		linkGen:     make(map[string]uint64),
		linkGaps:    make(map[string]bool),
	}
}

// useStore makes the hub hand every document's updates to the store of
// link, and take its answers; owed are the documents that owe the server
// edits from an earlier run, held open upstream until delivered.
func (h *hub) useStore(link *storeLink, owed []string) {
	h.store, h.storeReplies = link, link.replies
	for _, doc := range owed {
		h.held[doc] = true
	}
}

// run is the hub goroutine: the only code that touches h.docs and h.up.
// Each case hands one event to one method. When ctx is done it stops: every
// editor is closed with "going away", what their readers still deliver is
// flushed upstream until their handlers have returned (or hubStopTimeout),
// and then the upstream link is closed so that its writer flushes its
// queue. It closes h.quit when it returns, so that readers stop waiting.
func (h *hub) run(ctx context.Context) {
	defer close(h.quit)
	cancelled := ctx.Done()
	for !h.stopped() {
		select {
		case <-cancelled:
			cancelled = nil
			h.beginStop()
		case <-h.stopTimer:
			h.giveUpWaiting()
		case r := <-h.admission:
			r.reply <- h.admitOne(r.doc)
		case doc := <-h.released:
			h.releaseOne(doc)
		case c := <-h.join:
			h.addEditor(c)
		case l := <-h.leave:
			h.removeEditor(l.c, l.code)
		case f := <-h.fromEditors:
			h.fromLocal(f)
		case f := <-h.fromServer:
			h.fromUpstream(f)
		case ev := <-h.upstream:
			h.upstreamNews(ev)
		case reply := <-h.queries:
			reply <- h.snapshot()
		case r := <-h.storeReplies:
			h.fromStore(r)
		case now := <-h.sweep:
			h.expireGone(now)
		}
		h.routeRemovals()
	}
	h.finishStop()
}

// hubStopTimeout bounds the hub's part of a graceful stop.
const hubStopTimeout = 3 * time.Second

// beginStop closes every editor with "going away"; run goes on until
// their handlers have returned.
func (h *hub) beginStop() {
	h.stopping = true
	h.stopBy = time.Now().Add(cmp.Or(h.stopWait, hubStopTimeout))
	h.stopTimer = time.After(time.Until(h.stopBy))
	for _, d := range h.docs {
		for c := range d.conns {
			h.removeEditor(c, closeGoingAway)
		}
	}
}

// stopped reports whether the stop is over: no handler is left.
func (h *hub) stopped() bool { return h.stopping && h.handlers == 0 }

// giveUpWaiting ends the stop although handlers are still open.
func (h *hub) giveUpWaiting() {
	h.log.Warn("stop: editors did not close in time", "open", h.handlers)
	h.handlers = 0
}

// finishStop flushes what readers delivered last and closes the upstream
// link, whose writer then flushes its queue.
func (h *hub) finishStop() {
	for {
		select {
		case f := <-h.fromEditors:
			h.flushAtStop(f)
		default:
			if h.up != nil {
				h.closeLink()
			}
			if h.store != nil {
				if len(h.storeGaps) > 0 {
					h.log.Warn("stop: the store missed edits it could not fetch again; they are only in the editors or the server", "docs", truncatedList(slices.Sorted(maps.Keys(h.storeGaps)), 10))
				}
				close(h.store.ops) // the store writes what it has and ends
			}
			return
		}
	}
}

// hubStatus is the hub's part of the status page and the metrics, as of
// one moment: the documents open now, sorted by name, and the traffic in
// all since the start.
type hubStatus struct {
	editors       int
	docs          []docStatus
	editorTraffic traffic // from and to local editors
	serverTraffic traffic // from and to the server
}

// docStatus is one open document: its local editors, whether it is held
// open upstream for the store without any, and its traffic since it was
// opened (zero while held).
type docStatus struct {
	name    string
	editors int
	held    bool
	traffic traffic
}

// status asks the hub goroutine for a hubStatus. Errors: errStopping
// once the hub has ended, or ctx's error.
func (h *hub) status(ctx context.Context) (hubStatus, error) {
	reply := make(chan hubStatus, 1)
	select {
	case h.queries <- reply:
		return <-reply, nil // the hub answers at once
	case <-h.quit:
		return hubStatus{}, errStopping
	case <-ctx.Done():
		return hubStatus{}, ctx.Err()
	}
}

// snapshot is the hubStatus now (run answers queries with it).
func (h *hub) snapshot() hubStatus {
	st := hubStatus{
		docs:          make([]docStatus, 0, len(h.docs)+len(h.held)),
		editorTraffic: h.editorTraffic,
		serverTraffic: h.serverTraffic,
	}
	for name, d := range h.docs {
		st.editors += len(d.conns)
		st.docs = append(st.docs, docStatus{name: name, editors: len(d.conns), traffic: d.traffic})
	}
	for name := range h.held {
		if h.docs[name] == nil {
			st.docs = append(st.docs, docStatus{name: name, held: true})
		}
	}
	slices.SortFunc(st.docs, func(a, b docStatus) int { return strings.Compare(a.name, b.name) })
	return st
}

// limits bound the local connections, so that a client that opens sockets
// in a loop cannot grow memory or goroutines without end.
type limits struct {
	conns  int // in all (--max-connections)
	perDoc int // per document (--max-per-document)
}

// admitRequest asks the hub to admit one more local connection to doc; the
// hub answers on reply (buffered, so that it never blocks).
type admitRequest struct {
	doc   string
	reply chan error
}

var (
	errTooManyConns  = errors.New("too many connections; try again later")
	errTooManyPerDoc = errors.New("too many connections to this document; try again later")
)

// admit asks the hub for room for one more connection to doc before the
// upgrade. Every admitted request must be released when its upgrade
// fails or its connection ends (serve). Errors: errTooManyConns,
// errTooManyPerDoc, errStopping.
func (h *hub) admit(doc string) error {
	r := admitRequest{doc: doc, reply: make(chan error, 1)}
	select {
	case h.admission <- r:
		return <-r.reply
	case <-h.quit:
		return errStopping
	}
}

// release gives back the room that admit gave.
func (h *hub) release(doc string) {
	select {
	case h.released <- doc:
	case <-h.quit:
	}
}

// admitOne counts one more handler on doc if the limits allow it.
func (h *hub) admitOne(doc string) error {
	switch {
	case h.stopping:
		return errStopping
	case h.limits.conns > 0 && h.handlers >= h.limits.conns:
		return errTooManyConns
	case h.limits.perDoc > 0 && h.perDoc[doc] >= h.limits.perDoc:
		return errTooManyPerDoc
	}
	h.handlers++
	h.perDoc[doc]++
	return nil
}

// releaseOne counts one handler on doc less.
func (h *hub) releaseOne(doc string) {
	h.handlers--
	if h.perDoc[doc]--; h.perDoc[doc] <= 0 {
		delete(h.perDoc, doc)
	}
}

// document is the hub's state for one document name.
type document struct {
	name    string
	conns   map[*conn]struct{}
	owners  owners       // who announced which awareness client
	request stateRequest // the resync's question to one editor
	// introduced is when the relay last asked an editor here for the
	// awareness states it knows, for a client new upstream.
	introduced time.Time
	traffic    traffic // since the document was opened
}

// traffic counts messages and their bytes, both ways: in is what the
// relay received (from editors or the server), out what it queued to
// send. Owned by the hub goroutine.
type traffic struct {
	msgsIn, bytesIn, msgsOut, bytesOut uint64
}

// in counts one received message of n bytes.
func (t *traffic) in(n int) { t.msgsIn, t.bytesIn = t.msgsIn+1, t.bytesIn+uint64(n) }

// out counts one message of n bytes queued to be sent.
func (t *traffic) out(n int) { t.msgsOut, t.bytesOut = t.msgsOut+1, t.bytesOut+uint64(n) }

// has reports whether c is one of d's editors.
func (d *document) has(c *conn) bool {
	_, ok := d.conns[c]
	return ok
}

// stateRequest is the resync's question to one editor of a document for
// its whole document. A Yjs client answers every step 1 with one step 2,
// in order, so the editor has answered once its step 2s reach the count
// of step 1s it had been sent when it was asked.
type stateRequest struct {
	c      *conn // nil: no answer is due
	step1s int   // c's step 1s, the question included, when it was asked
}

// ask notes that c was just sent the question.
func (r *stateRequest) ask(c *conn) { r.c, r.step1s = c, c.step1s }

// answered notes a step 2 from c: once c has answered as many step 1s as
// it had been sent when it was asked, the question is no longer due.
func (r *stateRequest) answered(c *conn) {
	if r.c == c && c.step2s >= r.step1s {
		r.c = nil
	}
}

// awaits reports whether c was asked and has not answered yet.
func (r *stateRequest) awaits(c *conn) bool { return r.c != nil && r.c == c }

// addEditor registers c with its document. The newcomer is sent a step 1,
// and the document's other editors a query-awareness, so that the
// newcomer sees who is there at once rather than at their next renewal,
// up to 15 s later. During the stop c is closed at once.
func (h *hub) addEditor(c *conn) {
	d := h.docs[c.doc]
	if d == nil {
		d = &document{name: c.doc, conns: make(map[*conn]struct{})}
		h.docs[c.doc] = d
		if !h.stopping && !h.held[c.doc] {
			h.toUpstream(frame{doc: c.doc, kind: kindDocActive})
			if h.up != nil && !h.up.markers {
				// One connection for every document (elva mode): no
				// resync comes for this one, so the store syncs it now.
				h.linkUpStore(c.doc)
			}
		}
		delete(h.held, c.doc) // its editors keep it open now
	}
	c.traffic = &d.traffic
	// c goes in first: should the query close every other editor as slow,
	// the document must still be there for c.
	d.conns[c] = struct{}{}
	if h.stopping {
		h.removeEditor(c, closeGoingAway)
		return
	}
	// A y-websocket client sends only its step 1 when it connects; a Yjs
	// server answers with step 2 and a step 1 of its own, which makes the
	// client send what the server lacks (PROTOCOL.md §1). The store sends
	// the step 1 with its state vector; without one the relay asks for
	// everything: what the joiner made while disconnected reaches the
	// others and the upstream.
	if !h.toStore(storeOp{kind: opOpen, doc: c.doc, to: c}) && !h.queue(c, emptyStep1) {
		return // closed as slow at once: a queue with no room
	}
	for other := range d.conns {
		if other != c {
			h.queue(other, queryAwareness)
		}
	}
}

// removeEditor unregisters c and closes its send queue so that its writer
// sends a close frame with code. The awareness clients that c announced
// are marked gone for everyone else at once, rather than after the 30 s
// timeout of every peer. Removing an editor that is gone already does
// nothing.
func (h *hub) removeEditor(c *conn, code int) {
	d := h.docs[c.doc]
	if d == nil || !d.has(c) {
		return
	}
	delete(d.conns, c)
	c.end(code)
	if d.request.awaits(c) {
		d.request.c = nil
		if h.up != nil && !h.stopping {
			h.askForState(d) // another editor answers in its place
		}
	}
	if gone := d.owners.release(c); len(gone) > 0 {
		for _, msg := range removalMessages(gone) {
			h.removals = append(h.removals, frame{doc: c.doc, data: msg, kind: msgAwareness, from: c})
		}
		h.rememberGone(c.doc, gone)
	}
	if len(d.conns) == 0 {
		delete(h.docs, c.doc)
		if !h.stopping {
			delete(h.cut, c.doc) // a joiner's step 2 is the first again
			// After the removals: a mode with one connection per document
			// may close it once they are out.
			h.removals = append(h.removals, frame{doc: c.doc, kind: kindDocIdle})
			// The store says whether the document still owes the server
			// something, and the hub then holds it open (fromStore).
			h.toStore(storeOp{kind: opIdle, doc: c.doc})
		}
	}
}

// routeRemovals routes the awareness removals that removeEditor queued.
// Routing may close more editors, whose removals are routed in turn.
func (h *hub) routeRemovals() {
	for i := 0; i < len(h.removals); i++ {
		h.route(h.docs[h.removals[i].doc], h.removals[i])
	}
	clear(h.removals)
	h.removals = h.removals[:0]
}

// fromLocal passes an editor's message to the document's other editors
// and upstream, after noting the awareness clients it announces. During
// the stop it only goes upstream.
func (h *hub) fromLocal(f frame) {
	if h.stopping {
		h.flushAtStop(f)
		return
	}
	h.editorTraffic.in(len(f.data))
	d := h.docs[f.doc]
	registered := d != nil && d.has(f.from)
	if registered {
		d.traffic.in(len(f.data))
	}
	switch {
	case f.kind == msgAwareness && !registered:
		// The relay has closed f.from and sent removals for its clients;
		// their states must not come back from its last frames.
		return
	case f.kind == msgAwareness:
		if h.track(d, f.from, f.aware); !d.has(f.from) {
			return // closed while tracking: as above
		}
	case isStep1(f.data) && h.toStore(storeOp{kind: opStep1, doc: f.doc, data: f.data, to: f.from}):
		return // the store answers: the others need not, nor the server
	case isStep2(f.data):
		f.from.step2s++
		if d != nil {
			d.request.answered(f.from)
		}
	}
	if f.kind == msgSync && !isStep1(f.data) {
		h.toStore(storeOp{kind: opUpdate, doc: f.doc, data: f.data, local: true})
	}
	h.route(d, f)
}

// route passes a local message on. Sync messages never go back to their
// sender; awareness messages do, as the reference Yjs server does: a lone
// y-websocket client that hears nothing for 30 s drops its socket. d is
// f.doc's document, nil when it has no editor (any more).
func (h *hub) route(d *document, f frame) {
	if d != nil {
		for c := range d.conns {
			if c == f.from && f.kind != msgAwareness {
				continue
			}
			h.queue(c, f.data)
		}
	}
	if h.toUpstream(f) && d != nil {
		d.traffic.out(len(f.data))
	}
}

// fromUpstream passes a message from the upstream to every local editor of
// its document.
func (h *hub) fromUpstream(f frame) {
	d := h.docs[f.doc]
	h.serverTraffic.in(len(f.data))
	if d != nil {
		d.traffic.in(len(f.data))
	}
	// The store takes the server's sync messages of every document it is
	// syncing (linkGen): also in the moment between its last editor's
	// leaving and the store's answer that holds it, when the answer to a
	// ping may come.
	if f.kind == msgSync && h.store != nil && (d != nil || h.held[f.doc] || h.linkGen[f.doc] != 0) && !h.linkGaps[f.doc] && h.upstreamSyncToStore(f) {
		return
	}
	if d == nil {
		if h.stopping {
			h.drops.count(dropNoEditors)
		} else {
			h.drops.note(h.log, dropNoEditors, "doc", f.doc)
		}
		return
	}
	fresh := f.kind == msgAwareness && h.track(d, nil, f.aware)
	for c := range d.conns {
		h.queue(c, f.data)
	}
	if fresh {
		h.introduce(d)
	}
}

// upstreamSyncToStore hands a sync message from the upstream to the store
// and reports whether that is all: a step 1 is the store's to answer (one
// answer, not one per editor), an update also goes to the editors.
func (h *hub) upstreamSyncToStore(f frame) bool {
	if isStep1(f.data) {
		return h.toStore(storeOp{kind: opStep1, doc: f.doc, data: f.data})
	}
	h.toStore(storeOp{kind: opUpdate, doc: f.doc, data: f.data})
	return h.docs[f.doc] == nil
}

// toStore queues op for the store without blocking and reports whether it
// went; false without a store. When the queue is full the operation is
// dropped, counted, and its document noted for a repair (repairStore):
// nothing is lost silently.
func (h *hub) toStore(op storeOp) bool {
	if h.store == nil {
		return false
	}
	if len(h.storeGaps) > 0 || len(h.linkGaps) > 0 {
		h.repairStore()
	}
	if h.store.backlog.add(len(op.data), h.linkBytes) {
		select {
		case h.store.ops <- op:
			return true
		default:
			h.store.backlog.done(len(op.data))
		}
	}
	h.storeGaps[op.doc] = true
	h.drops.note(h.log, dropStoreBehind, "doc", op.doc, "ops", len(h.store.ops))
	return false
}

// repairStore asks the store, once its queue is at most half full, to
// fetch what it missed of each document with a gap: with a step 1 to one
// of the document's editors, or to the upstream when it has none.
func (h *hub) repairStore() {
	if len(h.store.ops) > cap(h.store.ops)/2 {
		return
	}
	for doc := range h.linkGaps {
		select {
		case h.store.ops <- storeOp{kind: opLinkUp, doc: doc, gen: h.linkGen[doc]}:
			delete(h.linkGaps, doc)
		default:
			return
		}
	}
	for doc := range h.storeGaps {
		op := storeOp{kind: opRepair, doc: doc}
		if d := h.docs[doc]; d != nil {
			for c := range d.conns {
				op.to = c
				break
			}
		}
		select {
		case h.store.ops <- op:
			delete(h.storeGaps, doc)
		default:
			return
		}
	}
}

// fromStore delivers the store's answer: a message for an editor (if it
// is still there) or for the upstream, or news that a document owes the
// server edits (it is held open upstream) or no longer (it is let go).
func (h *hub) fromStore(r storeReply) {
	switch {
	case r.owedNews && h.stopping:
	case r.owedNews && r.owed:
		if h.docs[r.doc] == nil && !h.held[r.doc] {
			h.held[r.doc] = true
			h.toUpstream(frame{doc: r.doc, kind: kindDocActive})
		}
	case r.owedNews:
		if h.held[r.doc] {
			delete(h.held, r.doc)
			h.toUpstream(frame{doc: r.doc, kind: kindDocIdle})
		}
		if h.docs[r.doc] == nil && !r.stillOwed {
			delete(h.linkGen, r.doc) // its next connection gets a new number
		}
	case r.to != nil:
		if d := h.docs[r.doc]; d != nil && d.has(r.to) {
			h.queue(r.to, r.data)
		}
	case r.gen != h.linkGen[r.doc] || h.linkGaps[r.doc]:
		// For an earlier connection, or before the store heard of this
		// one: its answer would be counted against the wrong step 1.
	default:
		h.toUpstream(frame{doc: r.doc, data: r.data, kind: msgSync})
	}
}

// introduceEvery is the least time between two awareness queries that
// newcomers on other relays cause on one document.
const introduceEvery = time.Second

// introduce asks one local editor of d for every awareness state it knows,
// because a client new to the relay has appeared upstream: an editor that
// joined through another relay (or straight on the server) would otherwise
// see this relay's editors only at their next renewal, up to 15 s later.
// The answer goes upstream like any awareness message. At most one query
// per introduceEvery and document, so a stream of new client IDs cannot
// turn into a stream of answers.
func (h *hub) introduce(d *document) {
	now := time.Now()
	if now.Sub(d.introduced) < introduceEvery {
		return
	}
	d.introduced = now
	for c := range d.conns {
		if h.queue(c, queryAwareness) {
			return
		}
	}
}

// track notes the awareness entries that owner announced on d (owner nil:
// the upstream) and reports whether a client new to d appeared. An
// editor that comes back with a clock the relay marked gone is asked to
// announce itself again first.
func (h *hub) track(d *document, owner *conn, entries []awarenessEntry) (fresh bool) {
	for _, e := range entries {
		if owner != nil {
			if h.welcomeBack(owner, e); !d.has(owner) {
				return fresh // closed as slow: it owns nothing now
			}
		}
		isNew, untracked := d.owners.note(owner, e)
		fresh = fresh || isNew
		if untracked {
			h.drops.note(h.log, dropUntracked, "doc", d.name, "limit", maxTrackedClients)
		}
	}
	return fresh
}

// welcomeBack answers an editor that announces a client at a clock no
// newer than the one the relay marked it gone with, which every peer would
// ignore: it sends the editor that removal, and the Yjs client, which
// never lets a peer remove its own state, steps its clock past it and
// announces itself again, to everyone. A client that reconnects after the
// relay closed it is thus visible at once rather than after two renewals.
func (h *hub) welcomeBack(c *conn, e awarenessEntry) {
	if msg := h.gone.welcomeBack(c.doc, e); msg != nil {
		h.queue(c, msg)
	}
}

// queue gives data to c without blocking and reports whether c is still
// open. A full queue closes c as a slow consumer: never skip a frame inside
// a conn that stays open.
func (h *hub) queue(c *conn, data []byte) bool {
	if c.backlog.add(len(data), h.connBytes) {
		if c.push(data) {
			if isStep1(data) {
				c.step1s++
			}
			h.editorTraffic.out(len(data))
			c.traffic.out(len(data)) // set by addEditor, before any queue
			return true
		}
		c.backlog.done(len(data))
	}
	h.drops.note(c.log, dropSlowEditor, "frames", c.queued.Load(), "bytes", c.backlog.bytes.Load())
	h.removeEditor(c, closeTryAgain)
	return false
}

// backlog counts the bytes waiting in one send queue: the hub adds what it
// queues, the writer marks done what it has written or dropped. An editor's
// limit (or the upstream queue's capacity) bounds its frames; the backlog
// bounds their bytes, which a count alone cannot: 256 frames of 32 MiB
// would be 8 GiB.
type backlog struct {
	bytes atomic.Int64
}

// add counts n more bytes unless that passes limit, which it reports.
func (b *backlog) add(n int, limit int64) bool {
	if b.bytes.Add(int64(n)) > limit {
		b.bytes.Add(-int64(n))
		return false
	}
	return true
}

// done counts n bytes less.
func (b *backlog) done(n int) { b.bytes.Add(-int64(n)) }

// queueBytes is the byte budget of one editor's send queue: room for two
// of the largest messages, and 64 MiB at least.
func queueBytes(maxMessage int) int64 {
	return max(64<<20, 2*int64(maxMessage))
}

// upstreamLink is the hub's handle on one upstream connection, whatever
// its protocol: the queue its writer takes frames from. The hub sends to
// send and alone closes it (closeLink), after which the writer flushes
// what is queued and closes the socket; the socket itself belongs to the
// upstream's serve goroutine (upstream.go).
type upstreamLink struct {
	send    chan frame // closed by the hub only
	backlog backlog    // bytes in send: added by the hub, done by the writer
	// overhead is what the link's framing adds to a message of doc on the
	// wire, in bytes (the ELVA ID prefix); nil: nothing.
	overhead func(doc string) int
	// markers asks for the marker frames (kindDocActive, kindDocIdle): a
	// mode with one connection per document opens and closes them by these.
	markers bool
}

// toUpstream queues f for the upstream writer without blocking. A full
// queue closes the upstream connection, which then reconnects and resyncs.
// While the upstream is down nothing is kept: the resync on reconnect
// makes up for it (see resync). It reports whether f was queued.
func (h *hub) toUpstream(f frame) bool {
	if h.standalone {
		return false
	}
	if isMarker(f) && (h.up == nil || !h.up.markers) {
		return false // a down link's resync marks every document again
	}
	if h.up == nil {
		if n, ok := h.drops.allow(dropUpstreamDown, time.Now()); ok {
			h.drops.write(h.log, dropUpstreamDown, n, "doc", f.doc)
		}
		return false
	}
	if (f.kind == msgSync && len(h.cut) > 0 && h.cut[f.doc]) || !h.fitsUpstream(f) {
		return false
	}
	if h.up.backlog.add(len(f.data), h.linkBytes) {
		select {
		case h.up.send <- f:
			if !isMarker(f) {
				h.serverTraffic.out(len(f.data))
			}
			return true
		default:
			h.up.backlog.done(len(f.data))
		}
	}
	if h.stopping {
		// Closing the link now would lose the flush of everything queued;
		// what does not fit is dropped instead, with the rest of its
		// document.
		h.cutAtStop(f)
		return false
	}
	h.log.Warn("upstream send queue full: reconnecting", "frames", len(h.up.send), "bytes", h.up.backlog.bytes.Load())
	h.closeLink()
	return false
}

// fitsUpstream reports whether f, with the link's overhead, is within the
// upstream's message limit. A server closes the whole connection on a
// larger one (Python websockets: 1009), and every resync would send it
// again; so it is dropped, and its document named once, while its local
// editors keep working together. After a sync message, nothing later of
// the document goes either (see cut): it would wait at the server for the
// one that is missing.
func (h *hub) fitsUpstream(f frame) bool {
	if h.upstreamMax <= 0 || len(f.data)+maxOverhead <= h.upstreamMax {
		return true // the common case: no framing's overhead to work out
	}
	size := len(f.data)
	if h.up.overhead != nil {
		size += h.up.overhead(f.doc)
	}
	if size <= h.upstreamMax {
		return true
	}
	if f.kind == msgSync {
		h.cut[f.doc] = true // later updates would depend on this one
	}
	h.drops.count(dropTooBigUpstream)
	if h.tooBigNamed[f.doc] {
		return false // named once per document
	}
	if len(h.tooBigNamed) >= maxNamedDocs {
		clear(h.tooBigNamed)
	}
	h.tooBigNamed[f.doc] = true
	info := dropInfo[dropTooBigUpstream]
	h.log.Log(context.Background(), info.level, info.msg, "doc", f.doc, "bytes", size, "limit", h.upstreamMax,
		"flag", "--upstream-max-message", "reason", info.name)
	return false
}

// maxOverhead is the most any framing adds to a message: two type bytes,
// a varuint length and the longest document name.
const maxOverhead = 2 + maxVaruintLen + maxIDBytes

// maxNamedDocs bounds the documents named in too-large warnings.
const maxNamedDocs = 1024

// cutAtStop drops f, which could not be flushed at the stop, and if it is
// a sync message everything later of its document too: a server must never
// get update n+1 without update n, which would stall every later update of
// that document. Awareness messages make no such chain.
func (h *hub) cutAtStop(f frame) {
	if f.kind == msgSync {
		h.cut[f.doc] = true
	}
	h.drops.note(h.log, dropNotFlushed, "doc", f.doc, "kind", f.kind)
}

// flushAtStop queues a frame that an editor's reader still delivered
// during the stop for the upstream. It may wait for room, up to stopBy:
// the upstream writer is draining the queue meanwhile, and closing the
// link for a full queue would throw away what the relay accepted.
// Awareness is dropped: every editor's removals are out already.
func (h *hub) flushAtStop(f frame) {
	if f.kind == msgAwareness {
		return
	}
	if f.kind == msgSync && !isStep1(f.data) {
		h.toStore(storeOp{kind: opUpdate, doc: f.doc, data: f.data, local: true})
	}
	if h.up == nil || h.cut[f.doc] {
		h.drops.count(dropNotFlushed)
		return
	}
	if !h.fitsUpstream(f) {
		return
	}
	h.up.backlog.add(len(f.data), math.MaxInt64) // waiting, not dropping
	select {
	case h.up.send <- f:
		return
	default:
	}
	wait := time.NewTimer(time.Until(h.stopBy))
	defer wait.Stop()
	select {
	case h.up.send <- f:
	case <-wait.C:
		h.up.backlog.done(len(f.data))
		h.cutAtStop(f)
	}
}

// upstreamEvent is news from the upstream side: the link of a connection
// that is up (attach) or has ended (detach), or a document whose own
// connection is up and wants its resync (resync; link nil).
type upstreamEvent struct {
	link   *upstreamLink
	attach bool
	resync string
}

// upstreamNews hands an upstreamEvent to the method it is for.
func (h *hub) upstreamNews(ev upstreamEvent) {
	switch {
	case ev.link == nil:
		h.resyncDoc(ev.resync)
	case ev.attach:
		h.useLink(ev.link)
	default:
		h.dropLink(ev.link)
	}
}

// attachLink hands l, the link of an upstream connection that is up, to
// the hub (linkTarget); false: the hub has stopped.
func (h *hub) attachLink(l *upstreamLink) bool {
	select {
	case h.upstream <- upstreamEvent{link: l, attach: true}:
		return true
	case <-h.quit:
		return false
	}
}

// detachLink tells the hub that l's connection has ended (linkTarget).
func (h *hub) detachLink(l *upstreamLink) {
	select {
	case h.upstream <- upstreamEvent{link: l}:
	case <-h.quit:
	}
}

// useLink makes l the upstream connection that frames go to, resyncs
// every document over it and sends the removals it missed. During the
// stop l is closed at once.
func (h *hub) useLink(l *upstreamLink) {
	if h.stopping {
		close(l.send)
		return
	}
	if h.up != nil {
		h.closeLink()
	}
	h.up = l
	clear(h.cut) // the resync sends each document whole
	h.resync()
	for doc, gone := range h.gone.takeOwed() {
		for _, msg := range removalMessages(gone) {
			h.toUpstream(frame{doc: doc, data: msg, kind: msgAwareness})
		}
	}
}

// resync brings every document with local editors up to date both ways
// after the upstream (re)connects: the upstream gets a sync step 1 with
// the empty state vector, which joins the relay to the document's room and
// makes the remote side send everything it has, and one local editor is
// asked for its whole document, which goes upstream. Why a resync and not
// a replay log: see the README (Outages).
func (h *hub) resync() {
	for name, d := range h.docs {
		h.toUpstream(frame{doc: name, kind: kindDocActive})
		h.syncUpstream(d, name)
	}
	for name := range h.held {
		h.toUpstream(frame{doc: name, kind: kindDocActive})
		h.syncUpstream(nil, name)
	}
}

// syncUpstream starts a document's sync over a new connection: the store
// sends what the server lacks and asks for what it lacks itself; without
// a store, the upstream is asked for everything and an editor for its
// whole document. d is nil for a held document.
func (h *hub) syncUpstream(d *document, doc string) {
	if h.store != nil {
		if !h.linkUpStore(doc) && d != nil {
			h.askForState(d) // the editors' content reaches the server meanwhile
		}
		return
	}
	if d == nil {
		return
	}
	h.toUpstream(frame{doc: doc, data: emptyStep1, kind: msgSync})
	h.askForState(d)
}

// linkUpStore numbers doc's new upstream connection and tells the store;
// false: its queue is full, and the opLinkUp goes with the repairs.
func (h *hub) linkUpStore(doc string) bool {
	h.syncs++
	h.linkGen[doc] = h.syncs
	if h.toStore(storeOp{kind: opLinkUp, doc: doc, gen: h.syncs}) {
		delete(h.linkGaps, doc)
		return true
	}
	h.linkGaps[doc] = true
	return false
}

// resyncDoc resyncs one document, whose own upstream connection (yjs
// mode) has just come up, and sends it the removals it missed.
func (h *hub) resyncDoc(doc string) {
	d := h.docs[doc]
	if (d == nil && !h.held[doc]) || h.stopping {
		return
	}
	delete(h.cut, doc)
	h.syncUpstream(d, doc)
	for _, msg := range removalMessages(h.gone.takeOwedOf(doc)) {
		h.toUpstream(frame{doc: doc, data: msg, kind: msgAwareness})
	}
}

// askForState asks one editor of d for its whole document and for the
// awareness states it knows, and remembers whom it asked: if that editor
// leaves before its step 2 comes, the next one is asked.
func (h *hub) askForState(d *document) {
	d.request.c = nil
	for c := range d.conns {
		if h.queue(c, emptyStep1) { // else c was closed as slow: try the next
			d.request.ask(c)
			h.queue(c, queryAwareness) // if this closes c, removeEditor asks again
			return
		}
	}
}

// dropLink forgets l if it is still the current upstream connection.
func (h *hub) dropLink(l *upstreamLink) {
	if h.up == l {
		h.closeLink()
	}
}

// closeLink closes the current link's queue; its writer flushes what is
// queued and closes the connection.
func (h *hub) closeLink() {
	close(h.up.send)
	h.up = nil
}

// rememberGone notes the clients just marked gone on doc: for welcomeBack,
// and as owed to the upstream if it is down now.
func (h *hub) rememberGone(doc string, gone []awarenessEntry) {
	now := time.Now()
	for _, e := range gone {
		h.gone.note(doc, e.client, e.clock, h.up == nil, now)
	}
	if h.sweep == nil {
		h.sweep = h.after(goneTTL)
	}
}

// expireGone forgets the gone clients older than goneTTL and sets the
// sweep for the next one.
func (h *hub) expireGone(now time.Time) {
	h.sweep = nil
	if next := h.gone.expire(now); !next.IsZero() {
		h.sweep = h.after(max(next.Sub(now), time.Second))
	}
}

// removalMessages marks the clients in gone as gone, in awareness messages
// of at most maxAwarenessEntries entries each, which every relay accepts.
func removalMessages(gone []awarenessEntry) [][]byte {
	var msgs [][]byte
	for len(gone) > 0 {
		n := min(len(gone), maxAwarenessEntries)
		msgs = append(msgs, appendAwarenessGone(nil, gone[:n]))
		gone = gone[n:]
	}
	return msgs
}

// presence is one awareness client as the relay last heard of it.
type presence struct {
	clock uint64
	owner *conn // nil: announced by the upstream
}

// owners is one document's awareness table: for each client the newest
// clock seen and the editor that brought that clock first (nil: the
// upstream). Yjs clients re-broadcast every awareness change they apply,
// so "first with a new clock" finds a client's own editor, and an editor
// that merely repeats others' states owns none of them. A pure table: no
// channels, no logging; the hub owns it.
type owners struct {
	clients map[uint64]presence
	remote  int // entries the upstream owns
	max     int // 0: maxTrackedClients
}

// note applies one entry announced by owner (nil: the upstream): a newer
// clock takes the client over; a null state at the same or a newer clock
// forgets it. It reports whether the client is new to the table, and
// whether it could not be tracked because the table is full.
func (o *owners) note(owner *conn, e awarenessEntry) (fresh, untracked bool) {
	p, known := o.clients[e.client]
	switch {
	case known && e.clock < p.clock:
	case known && e.clock == p.clock:
		if e.gone {
			o.forget(e.client)
		}
	case e.gone:
		o.forget(e.client)
	case known || o.makeRoom(owner):
		o.set(e.client, presence{clock: e.clock, owner: owner})
		return !known, false
	default:
		return false, true
	}
	return false, false
}

// release forgets the clients that owner owns and returns them with their
// last clocks.
func (o *owners) release(owner *conn) []awarenessEntry {
	var gone []awarenessEntry
	for id, p := range o.clients {
		if p.owner == owner {
			gone = append(gone, awarenessEntry{client: id, clock: p.clock})
			o.forget(id)
		}
	}
	return gone
}

// set records p for client, keeping the count of upstream-owned entries.
func (o *owners) set(client uint64, p presence) {
	if o.clients == nil {
		o.clients = make(map[uint64]presence)
	}
	if old, ok := o.clients[client]; ok && old.owner == nil {
		o.remote--
	}
	if p.owner == nil {
		o.remote++
	}
	o.clients[client] = p
}

// forget drops client's entry, keeping the count of upstream-owned entries.
func (o *owners) forget(client uint64) {
	if old, ok := o.clients[client]; ok {
		if old.owner == nil {
			o.remote--
		}
		delete(o.clients, client)
	}
}

// makeRoom reports whether the table may take one more client for owner.
// When it is full, a client of the upstream is not tracked (it needs no
// removal from this relay), and a local one makes room by forgetting the
// upstream's clients: one scan that empties them all, so it cannot repeat
// per entry.
func (o *owners) makeRoom(owner *conn) bool {
	limit := cmp.Or(o.max, maxTrackedClients)
	if len(o.clients) < limit {
		return true
	}
	if owner != nil && o.remote > 0 {
		for id, p := range o.clients {
			if p.owner == nil {
				o.forget(id)
			}
		}
	}
	return len(o.clients) < limit
}

// goneTTL is how long the relay remembers an awareness client it marked
// gone: Yjs clients forget a peer they have not heard of for 30 s
// (y-protocols awareness outdatedTimeout), so neither a revival nor a
// removal owed to the upstream matters after that.
const goneTTL = 30 * time.Second

// maxGone bounds the entries of the gone table over all documents; past
// it the oldest entry makes room, one at a time.
const maxGone = 1 << 16

// goneKey names one awareness client of one document.
type goneKey struct {
	doc    string
	client uint64
}

// goneEntry is a client the relay marked gone: the last clock it had, when,
// and whether the removal still has to go upstream.
type goneEntry struct {
	clock uint64
	at    time.Time
	owed  bool
}

// goneTable remembers the awareness clients the relay marked gone, for
// goneTTL: to revive one that comes back with an old clock, and to send
// the upstream the removals it missed while down. A pure table: no
// channels, no logging; the hub owns it.
type goneTable struct {
	entries map[goneKey]goneEntry
	// order lists the notes oldest first; a key noted again appears twice,
	// and the older mention is skipped when it comes up.
	order []goneNote
	max   int // 0: maxGone
}

// goneNote is one mention in goneTable.order.
type goneNote struct {
	key goneKey
	at  time.Time
}

// note remembers that client of doc was marked gone at clock, now; owed
// says that the removal could not go upstream.
func (g *goneTable) note(doc string, client, clock uint64, owed bool, now time.Time) {
	key := goneKey{doc, client}
	if _, ok := g.entries[key]; !ok {
		for len(g.entries) >= cmp.Or(g.max, maxGone) {
			g.dropOldest()
		}
	}
	if g.entries == nil {
		g.entries = make(map[goneKey]goneEntry)
	}
	g.entries[key] = goneEntry{clock: clock, at: now, owed: owed}
	g.order = append(g.order, goneNote{key, now})
	if len(g.order) > 2*cmp.Or(g.max, maxGone) {
		g.compact()
	}
}

// compact drops the mentions of keys noted again since, which a client
// that comes and goes leaves behind: order stays within twice the bound.
func (g *goneTable) compact() {
	kept := g.order[:0]
	for _, n := range g.order {
		if e, ok := g.entries[n.key]; ok && e.at.Equal(n.at) {
			kept = append(kept, n)
		}
	}
	clear(g.order[len(kept):])
	g.order = kept
}

// lookup returns the entry of client on doc.
func (g *goneTable) lookup(doc string, client uint64) (goneEntry, bool) {
	e, ok := g.entries[goneKey{doc, client}]
	return e, ok
}

// forget drops the entry of client on doc: it is back.
func (g *goneTable) forget(doc string, client uint64) {
	delete(g.entries, goneKey{doc, client})
	g.shrink()
}

// takeOwedOf returns the removals owed to the upstream for doc and marks
// them sent.
func (g *goneTable) takeOwedOf(doc string) []awarenessEntry {
	var owed []awarenessEntry
	for key, e := range g.entries {
		if e.owed && key.doc == doc {
			owed = append(owed, awarenessEntry{client: key.client, clock: e.clock})
			e.owed = false
			g.entries[key] = e
		}
	}
	return owed
}

// takeOwed returns the removals owed to the upstream, by document, and
// marks them sent.
func (g *goneTable) takeOwed() map[string][]awarenessEntry {
	owed := make(map[string][]awarenessEntry)
	for key, e := range g.entries {
		if e.owed {
			owed[key.doc] = append(owed[key.doc], awarenessEntry{client: key.client, clock: e.clock})
			e.owed = false
			g.entries[key] = e
		}
	}
	return owed
}

// expire drops the entries noted goneTTL or more before now, and returns
// when the next one expires (zero: the table is empty).
func (g *goneTable) expire(now time.Time) time.Time {
	for len(g.order) > 0 && now.Sub(g.order[0].at) >= goneTTL {
		g.dropOldest()
	}
	if len(g.order) == 0 {
		return time.Time{}
	}
	return g.order[0].at.Add(goneTTL)
}

// dropOldest drops the oldest mention, and its entry unless that was
// noted again since.
func (g *goneTable) dropOldest() {
	n := g.order[0]
	g.order = g.order[1:]
	if e, ok := g.entries[n.key]; ok && e.at.Equal(n.at) {
		delete(g.entries, n.key)
	}
	g.shrink()
}

// shrink lets the memory of an emptied table go: Go maps and slices keep
// their size after deletes.
func (g *goneTable) shrink() {
	if len(g.entries) == 0 {
		g.entries, g.order = nil, nil
	}
}

// welcomeBack returns, for an editor that announces e on doc, the removal
// that makes it announce itself again if the relay marked the client gone
// at a clock no older than e's (nil: nothing to send), and forgets the
// entry: the client is back.
func (g *goneTable) welcomeBack(doc string, e awarenessEntry) []byte {
	was, ok := g.lookup(doc, e.client)
	if !ok || e.gone {
		return nil
	}
	g.forget(doc, e.client)
	if e.clock > was.clock+1 { // the removal went out at was.clock+1
		return nil
	}
	return appendAwarenessGone(nil, []awarenessEntry{{client: e.client, clock: was.clock}})
}

// len is the number of clients remembered.
func (g *goneTable) len() int { return len(g.entries) }

// serve runs one upgraded editor connection, nc, until either side ends
// it; then it closes nc and gives back the admission that ServeHTTP got.
// pending holds the bytes the HTTP server had read past the handshake. It
// is the editor's reader goroutine, started afresh so that the HTTP
// server's goroutine, whose stack grew while it parsed the request, could
// return. An idle editor's reader waits here, so its frames are kept small
// (the work is in enter, exit and readLoop's handle): its stack then
// stays at 4 KiB.
func (h *hub) serve(nc net.Conn, pending []byte, doc, remote string) {
	defer h.release(doc)
	defer nc.Close()
	c := h.newConn(nc, pending, doc, remote)
	defer c.in.release()
	if h.enter(c) {
		code, err := c.readLoop(h)
		h.exit(c, code, err)
	}
}

// enter hands c to the hub and reports whether it took it; at the stop it
// closes c with "going away" instead.
func (h *hub) enter(c *conn) bool {
	select {
	case h.join <- c:
		h.drops.note(c.log, editorJoined)
		return true
	case <-h.quit:
		c.sendClose(closeGoingAway) // no writer runs: the hub never had c
		return false
	}
}

// exit tells the hub that c's reader has ended with code and err, waits
// for c's writer to reach the end of its queue, and for the peer's answer
// to a close that the relay started.
func (h *hub) exit(c *conn, code int, err error) {
	select {
	case h.leave <- leaving{c, code}:
	case <-h.quit:
	}
	<-c.done
	if code != closeNormal && !isPeerClose(err) {
		c.awaitPeerClose(h.maxMessage)
	}
	h.drops.note(c.log, closeReason(c.closeCode, err), closeAttrs(c.closeCode, err)...)
}

// newConn makes the conn of an editor whose socket is nc, with pending,
// the bytes read past the handshake, still to be read.
func (h *hub) newConn(nc net.Conn, pending []byte, doc, remote string) *conn {
	ka := h.keepalive
	first := &segment{ch: make(chan []byte, min(minSegment, h.connQueue))}
	c := &conn{doc: doc, remote: remote, limit: h.connQueue, tail: first, head: first}
	c.peer = makePeer(h.log.With("doc", doc, "remote", remote), ka)
	c.nc, c.raw = nc, nc
	// Pings follow the read deadline rather than a ticker of the writer's,
	// which would keep a goroutine and a timer per editor.
	c.live = newLiveness(nc, ka.timeout, ka.interval)
	c.wake = c.nudgeWriter
	c.w = pumpState{p: &c.peer}
	c.in = wireReader{buf: pending, w: len(pending), full: len(pending) > 0}
	return c
}

// closeReason sorts the end of an editor's connection, from the code the
// relay closed it with and the error that ended its reader.
func closeReason(code int, err error) dropReason {
	var pc *peerCloseError
	switch {
	case errors.As(err, &pc) && !pc.answer:
		return closedByEditor
	case code == closePeerTimeout:
		return closedTimeout
	case code == closeTryAgain:
		return closedSlow
	case code == closeGoingAway:
		return closedStop
	case code == closeProtocol, code == closeUnsupported, code == closeTooBig:
		return closedBadFrame
	}
	return closedBroken
}

// closeAttrs gives the log attributes of a connection's end: the code the
// relay closed with, and the peer's own code and reason when the peer
// closed, or the error that ended the reader.
func closeAttrs(code int, err error) []any {
	var pc *peerCloseError
	if errors.As(err, &pc) && !pc.answer {
		return []any{"code", code, "closed_by", "peer", "peer_code", pc.code, "peer_reason", pc.reason}
	}
	if pc != nil {
		return []any{"code", code, "closed_by", "relay", "peer_code", pc.code}
	}
	return []any{"code", code, "err", err}
}

// awaitPeerClose reads and drops frames until the peer answers the close
// frame that the relay sent (after a protocol error or a timeout), or the
// grace that sendClose set runs out. Closing the socket with the peer's
// bytes unread would make the kernel reset it, and the peer might never
// see the close code.
func (c *conn) awaitPeerClose(max int) {
	r := frameReader{p: &c.peer, in: &c.in, max: max}
	for {
		if _, err := r.next(); err != nil {
			return
		}
	}
}

// readLoop is the conn's reader: it hands every well-formed message to the
// hub. It returns the close code to answer with and the reason it ended.
// Once the writer has sent its close frame (c.closing) it passes frames on
// only while the hub has room, and reads on until the peer answers the
// close or the grace runs out:
// closing a socket with unread bytes makes the kernel reset it, and the
// peer could lose what the relay sent last.
func (c *conn) readLoop(h *hub) (int, error) {
	r := frameReader{p: &c.peer, in: &c.in, max: h.maxMessage}
	delivering := true // false once a frame could not be handed on
	for {
		data, err := r.next()
		if err != nil {
			return closeCodeFor(err), err
		}
		delivering = c.handle(h, data, delivering)
	}
}

// handle checks one message from the editor and, while delivering, hands
// it to the hub; it reports whether to go on delivering: after a gap
// nothing later of this editor goes.
func (c *conn) handle(h *hub, data []byte, delivering bool) bool {
	f, err := checkLocal(c, data)
	if err != nil {
		h.drops.note(c.log, dropMalformed, "bytes", len(data), "err", err)
		return delivering
	}
	if !delivering {
		return false
	}
	if !c.deliver(h, f) {
		h.drops.note(c.log, dropNotFlushed, "kind", f.kind)
		return false
	}
	if c.log.Enabled(context.Background(), slog.LevelDebug) {
		c.log.Debug("message from editor", "kind", f.kind, "bytes", len(data))
	}
	return true
}

// deliver gives f to the hub and reports whether it did. A frame read from
// the peer goes to the hub whenever the hub has room, even while the conn
// is closing (at a stop its frames still go upstream); only a full inbox
// lets closing, or the hub's end, drop it.
func (c *conn) deliver(h *hub, f frame) bool {
	select {
	case <-h.quit: // the hub has drained its inbox for the last time
		return false
	default:
	}
	select {
	case h.fromEditors <- f:
		return true
	default:
	}
	select {
	case h.fromEditors <- f:
		return true
	case <-c.closing:
	case <-h.quit:
	}
	return false
}

// checkLocal checks one message from c and makes it a frame for the hub,
// with its awareness entries decoded here rather than in the hub.
func checkLocal(c *conn, data []byte) (frame, error) {
	kind, err := messageKind(data)
	if err != nil {
		return frame{}, err
	}
	f := frame{doc: c.doc, data: data, kind: kind, from: c}
	if kind == msgAwareness {
		f.aware, err = readAwareness(data, nil)
	}
	return f, err
}

// peer is one WebSocket, an editor's or the upstream's, and what its
// reader (a frameReader) and its writer share. An editor's frames are read
// and written here on its socket, nc, by the conn's reader and on-demand
// writer; the upstream's go through x/net/websocket's ws, written by pump.
type peer struct {
	// Static after construction.
	ws  *websocket.Conn // the upstream's socket, framed by x/net/websocket; nil for an editor
	nc  net.Conn        // an editor's socket, framed here; nil for the upstream
	raw io.Closer       // closes the socket (the upstream's TCP or TLS conn; an editor's nc)
	log *slog.Logger
	ka  keepalive
	// grace is how long to wait for the answer to a close frame.
	grace   time.Duration
	live    *liveness     // the read deadline, pushed out by both goroutines
	pongs   chan []byte   // ping payloads to answer, reader → writer; room for one
	echo    chan int      // the peer's close code to answer, reader → writer; room for one
	closing chan struct{} // closed by the writer once its close frame is out
	done    chan struct{} // closed once the writer has reached the end of its queue
	// wake is how the reader has an on-demand writer see that pongs, echo
	// or live.pingWanted hold something (an editor's nudgeWriter); nil:
	// the writer runs all along (pump).
	wake func()

	// closeCode is written by the hub just before it ends the send queue
	// and read by the writer after that, so the queue's end orders the
	// two. 0: closeNormal.
	closeCode int
}

// makePeer returns the parts of a peer that do not depend on its socket.
func makePeer(log *slog.Logger, ka keepalive) peer {
	return peer{
		log:     log,
		ka:      ka,
		grace:   closeGrace,
		pongs:   make(chan []byte, 1),
		echo:    make(chan int, 1),
		closing: make(chan struct{}),
		done:    make(chan struct{}),
	}
}

// newPeer wraps the upstream's ws, whose dead-peer checks follow ka; its
// writer, pump, pings every ka.interval.
func newPeer(ws *websocket.Conn, log *slog.Logger, ka keepalive) peer {
	p := makePeer(log, ka)
	p.ws, p.raw = ws, ws
	p.live = newLiveness(ws, ka.timeout, 0)
	return p
}

// tellWriter has an on-demand writer see what the reader has just put in
// pongs, echo or live.pingWanted; the upstream's pump watches the first
// two itself. Reader only.
func (p *peer) tellWriter() {
	if p.wake != nil {
		p.wake()
	}
}

// sendClose sends a close frame with code and gives the peer p.grace to
// answer before the reader gives up. Writer only (or before any runs).
func (p *peer) sendClose(code int) {
	if p.ws != nil {
		writeClose(p.ws, code)
	} else {
		writeRaw(p.nc, closeFrame(code), nil)
	}
	p.endReader()
}

// closed reports whether the relay's close frame is out.
func (p *peer) closed() bool {
	select {
	case <-p.closing:
		return true
	default:
		return false
	}
}

// endReader tells the reader that the close frame is out: it may read for
// p.grace more, for the peer's answer. closing is closed before the
// deadline is set, and the reader sets its idle deadline before it looks
// at closing, so whichever runs last, the reader cannot wait past grace.
func (p *peer) endReader() {
	close(p.closing)
	p.live.conn.SetReadDeadline(time.Now().Add(p.grace))
}

// Writer states (conn.writer): none runs; one runs; one runs and must
// look again before it ends, because something new waits.
const (
	writerIdle = iota
	writerRunning
	writerAgain
)

// wakeWriter makes sure that c's writer sees what the caller has just put
// where writers look (the send queue, pongs, echo, live.pingWanted): it
// starts a writer goroutine when none runs, or else tells the one running
// to look again before it ends. Only the caller that finds the state idle
// starts one, and only a writer that has looked since the last wake sets
// it back to idle, so one writer runs at a time and nothing is left
// waiting.
func (c *conn) wakeWriter() {
	if c.writer.Swap(writerAgain) == writerIdle {
		go c.write()
	}
}

// write is c's writer goroutine, started by wakeWriter, and while it runs
// the only code that writes to the socket: it writes what waits and
// returns once it has looked and found nothing more. An idle editor thus
// has no writer goroutine and holds no write buffer.
func (c *conn) write() {
	for {
		// A swap, not a store: it reads the state, and so sees everything
		// that the wakes before it made visible.
		c.writer.Swap(writerRunning)
		c.writeWaiting()
		if c.writer.CompareAndSwap(writerRunning, writerIdle) {
			return
		}
	}
}

// nudgeWriter is the reader's wakeWriter, after it has put a pong, the
// answer to a close or a ping where writers look. When no writer runs it
// takes the writer's part itself and writes them, a few bytes on a socket
// with nothing queued, rather than start a goroutine for them: an idle
// editor's ping then costs no goroutine and no wake of another thread. If
// something was queued meanwhile, a writer goroutine takes over. Reader
// only.
func (c *conn) nudgeWriter() {
	if !c.writer.CompareAndSwap(writerIdle, writerRunning) {
		c.wakeWriter()
		return
	}
	for c.writeControl() {
	}
	if !c.writer.CompareAndSwap(writerRunning, writerIdle) {
		go c.write() // the state stays running: the role passes on
	}
}

// writeWaiting writes what waits, control frames before data (RFC 6455
// §5.4 lets them go between messages), then the send queue in batches. It
// returns when it finds nothing. Writer only.
func (c *conn) writeWaiting() {
	for c.writeControl() || c.writeBatch() {
	}
}

// writeControl writes one control frame that waits, if any, and reports
// whether it found one: the answer to the peer's close, a pong, a ping.
// Writer only.
func (c *conn) writeControl() bool {
	select {
	case code := <-c.echo:
		c.w.close(code) // RFC 6455 §5.5.1: answer, then send no more data
	case payload := <-c.pongs:
		c.w.control(opPong, payload)
	default:
		if !c.live.pingWanted.Swap(false) {
			return false
		}
		c.w.control(opPing, c.live.pingPayload())
	}
	return true
}

// maxBatch is how many bytes of frames writeBatch gathers for one write;
// a larger message goes on its own.
const maxBatch = 32 << 10

// batchBuffers holds writeBatch's buffers between batches, so that an idle
// editor holds none.
var batchBuffers = sync.Pool{New: func() any { return new([]byte) }}

// writeBatch takes the frames waiting in the send queue until it has taken
// maxBatch bytes or more (under 2*maxBatch) and writes them as binary
// frames in one write: one write(2) per delivery was most of the relay's
// CPU. It reports whether it found anything. At the queue's end it sends
// the close frame (c.closeCode) and closes c.done; after a failed write it
// takes frames without writing them, so that the hub never sees a dead
// peer as slow. Bytes are marked written (the hub's backlog) once they are
// in the batch, so a writer may hold one batch beyond its queue's budget.
// Writer only.
func (c *conn) writeBatch() (found bool) {
	var buf *[]byte
	var b []byte
	payload, taken := 0, 0
	for taken < maxBatch { // past it, pings, pongs and the answer to a close get their turn
		msg, got := c.take()
		if got == queueEmpty {
			break
		}
		found = true
		if got == queueEnded {
			b = c.w.flushBatch(b, payload)
			c.w.close(cmp.Or(c.closeCode, closeNormal))
			close(c.done)
			break
		}
		taken += len(msg)
		switch {
		case !c.w.open():
		case len(msg) > maxBatch:
			b, payload = c.w.flushBatch(b, payload), 0
			c.w.data(msg) // on its own, not copied
		default:
			if buf == nil {
				buf = batchBuffers.Get().(*[]byte)
				b = (*buf)[:0]
			}
			b, payload = appendServerFrame(b, opBinary, msg), payload+len(msg)
		}
		c.backlog.done(len(msg))
	}
	b = c.w.flushBatch(b, payload)
	if buf != nil && cap(b) <= 2*maxBatch {
		*buf = b
		batchBuffers.Put(buf)
	}
	return found
}

// What take finds in the send queue.
const (
	queueEmpty = iota // nothing waits
	queueFrame        // a frame
	queueEnded        // the queue's end: the hub has closed the conn
)

// take returns the send queue's next frame without waiting, and moves on
// from segment to segment; after the queue's end it finds nothing. Writer
// only.
func (c *conn) take() ([]byte, int) {
	for c.head != nil {
		select {
		case msg, ok := <-c.head.ch:
			if ok {
				c.queued.Add(-1)
				return msg, queueFrame
			}
			if c.head = c.head.next; c.head == nil {
				return nil, queueEnded
			}
		default:
			return nil, queueEmpty
		}
	}
	return nil, queueEmpty
}

// push puts msg on c's send queue and wakes the writer, without blocking.
// It reports false when the queue holds c.limit frames already. Hub only.
func (c *conn) push(msg []byte) bool {
	if !c.enqueue(msg) {
		return false
	}
	c.wakeWriter()
	return true
}

// enqueue is push without the wake. A full segment is followed by one
// twice its size (up to c.limit), and an oversized one by one of
// minSegment once the writer has emptied it and ended, so that a burst's
// room goes once the burst is over (and not while a busy writer keeps up
// with it). Hub only.
func (c *conn) enqueue(msg []byte) bool {
	if int(c.queued.Load()) >= c.limit {
		return false
	}
	switch n := cap(c.tail.ch); {
	case len(c.tail.ch) == n:
		c.grow(min(2*n, c.limit))
	case n > minSegment && len(c.tail.ch) == 0 && c.writer.Load() == writerIdle:
		c.grow(minSegment)
	}
	c.queued.Add(1)
	c.tail.ch <- msg // never blocks: the segment has room, and the hub alone sends
	return true
}

// grow continues the send queue in a new segment of n frames. Hub only.
func (c *conn) grow(n int) {
	s := &segment{ch: make(chan []byte, n)}
	c.tail.next = s
	close(c.tail.ch) // hands the writer on to s once it has drained this one
	c.tail = s
}

// end ends c's send queue: the writer writes what is queued, then a close
// frame with code. Hub only.
func (c *conn) end(code int) {
	c.closeCode = code
	close(c.tail.ch)
	c.wakeWriter()
}

// pump is the upstream's writer goroutine, the only code that writes to
// p.ws: the messages from send (encoded by encode; written is called for
// each, sent or not, to free its bytes), pings every p.ka.interval, pongs
// and the answer to the peer's close. After a failed write it drains send
// until the hub closes it. When send is closed it has written everything
// queued; it sends its close frame (p.closeCode) and returns. (An editor's
// writer runs only on demand: see conn.write.)
func pump[T any](p *peer, send <-chan T, encode func(T) []byte, written func(T)) {
	defer close(p.done)
	w := pumpState{p: p}
	var tick <-chan time.Time // nil: no pings
	if p.ka.interval > 0 {
		t := time.NewTicker(p.ka.interval)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case m, ok := <-send:
			if !ok {
				w.close(cmp.Or(p.closeCode, closeNormal))
				return
			}
			if msg := encode(m); msg != nil && w.open() {
				w.data(msg)
			}
			written(m)
		case <-tick:
			w.control(opPing, p.live.pingPayload())
		case payload := <-p.pongs:
			w.control(opPong, payload)
		case code := <-p.echo:
			w.close(code) // RFC 6455 §5.5.1: answer, then send no more data
		}
	}
}

// pumpState is what the writer knows of its socket. Writer only; an
// editor's lives on in its conn from one writer goroutine to the next.
type pumpState struct {
	p      *peer
	failed bool // a write failed: the socket is closed
	closed bool // the close frame is out: no more frames
}

// open reports whether frames may still be written.
func (w *pumpState) open() bool { return !w.failed && !w.closed }

// data writes one binary message and credits the peer with the time its
// bytes take to arrive (see liveness).
func (w *pumpState) data(msg []byte) {
	var err error
	if w.p.ws != nil {
		err = writeMessage(w.p.ws, msg)
	} else {
		err = writeRaw(w.p.nc, appendServerHeader(nil, opBinary, len(msg)), msg)
	}
	if err != nil {
		w.fail(err)
		return
	}
	w.p.live.sent(len(msg))
}

// flushBatch writes the frames in b, which carry payload bytes of data,
// to an editor's socket, and returns b emptied.
func (w *pumpState) flushBatch(b []byte, payload int) []byte {
	if len(b) == 0 || !w.open() {
		return b[:0]
	}
	if err := writeRaw(w.p.nc, b, nil); err != nil {
		w.fail(err)
	} else {
		w.p.live.sent(payload)
	}
	return b[:0]
}

// control writes a ping or pong frame, if frames may still be written.
func (w *pumpState) control(opcode byte, payload []byte) {
	if !w.open() {
		return
	}
	var err error
	if w.p.ws != nil {
		err = writeFrame(w.p.ws, opcode, payload)
	} else {
		err = writeRaw(w.p.nc, appendServerFrame(make([]byte, 0, 2+len(payload)), opcode, payload), nil)
	}
	if err != nil {
		w.fail(err)
	}
}

// close sends the close frame with code, once.
func (w *pumpState) close(code int) {
	if w.open() {
		w.p.sendClose(code)
	}
	w.closed = true
}

// fail ends writing after an error: the socket is closed, which ends the
// reader at once.
func (w *pumpState) fail(err error) {
	w.p.log.Debug("write failed", "err", err)
	w.failed = true
	w.p.raw.Close()
}

// liveness is a peer's read deadline: the time of the last frame heard from
// the peer, plus --peer-timeout, plus the time the bytes still owed to or
// by the peer take at minTransferRate. Bytes the relay wrote are owed until
// a pong proves them delivered: every ping carries the count of bytes
// written before it, and TCP delivers in order, so its pong acknowledges
// them all. A peer behind a slow link that is still taking a large write is
// thus alive although its pongs wait behind that write; a peer that takes
// nothing is found dead once those bytes could have arrived; and a peer
// that has taken everything gets no more time than the timeout. For an
// editor the deadline also comes at the next ping (pingAt): the reader,
// woken by it, asks the writer for the ping (see frameReader.keepWaiting),
// so that pings cost no timer and no goroutine of their own.
type liveness struct {
	conn     readDeadliner
	timeout  time.Duration // 0: no deadline
	interval time.Duration // between the pings that the deadline brings; 0: none
	heard    atomic.Int64  // when the last frame came, in monoNow's nanoseconds
	incoming atomic.Int64  // bytes of the frame being read
	written  atomic.Int64  // data bytes written to the peer
	acked    atomic.Int64  // of those, the ones a pong proved delivered
	applied  atomic.Int64  // the deadline last set, in monoNow's nanoseconds
	pingAt   atomic.Int64  // when the next ping is due, in monoNow's nanoseconds; 0: never
	// pingWanted asks an editor's writer for a ping: set by the reader
	// when one is due, taken by the writer.
	pingWanted atomic.Bool
}

// readDeadliner is a socket whose read deadline liveness sets: an editor's
// net.Conn or the upstream's websocket.Conn.
type readDeadliner interface {
	SetReadDeadline(t time.Time) error
}

// maxOwed caps the bytes a peer is given time for: a peer whose pongs
// carry no byte count (not an echo of the ping) never acknowledges any,
// and a connection's lifetime of bytes must not become hours of grace.
// An editor's send queue holds at most 64 MiB (queueBytes) anyway.
const maxOwed = 64 << 20

// monoBase anchors monoNow: times taken as nanoseconds since it are
// monotonic, so a wall-clock step (NTP, a laptop waking) moves no deadline.
var monoBase = time.Now()

// monoNow is the time now, in nanoseconds since monoBase.
func monoNow() int64 { return int64(time.Since(monoBase)) }

// deadlineSlack is how much later than the deadline set the writer lets
// the owed bytes' deadline be before it sets it again: setting a deadline
// per message would cost every write.
const deadlineSlack = 100 * time.Millisecond

// newLiveness starts the clock of a peer heard from just now, with a ping
// due every interval (0: none).
func newLiveness(conn readDeadliner, timeout, interval time.Duration) *liveness {
	l := &liveness{conn: conn, timeout: timeout, interval: interval}
	now := monoNow()
	l.heard.Store(now)
	if interval > 0 {
		l.pingAt.Store(nextPing(now, interval))
	}
	return l
}

// pingSlots is how many times per ping interval the editors' pings may
// fall due: each ping's time is rounded up to the next slot, so that the
// pings of editors that joined close together go out in one wake-up of
// the relay, not one each. A ping then comes every interval to
// interval*(1+1/pingSlots).
const pingSlots = 8

// nextPing is when the ping after one at now (monoNow's nanoseconds) is
// due: interval later, rounded up to the next slot.
func nextPing(now int64, interval time.Duration) int64 {
	slot := max(int64(interval)/pingSlots, 1)
	at := now + int64(interval)
	return (at + slot - 1) / slot * slot
}

// heardFrame restarts the clock: the peer sent a frame. Reader only.
func (l *liveness) heardFrame() error {
	l.heard.Store(monoNow())
	l.incoming.Store(0)
	return l.apply()
}

// expect grants the peer the time size bytes of a frame take to arrive.
// Reader only.
func (l *liveness) expect(size int) error {
	l.incoming.Store(int64(size))
	return l.apply()
}

// sent counts n more data bytes written to the peer. Writer only.
func (l *liveness) sent(n int) {
	l.written.Add(int64(n))
	if l.timeout > 0 && l.deadline()-l.applied.Load() >= int64(deadlineSlack) {
		l.apply()
	}
}

// pingPayload is the payload of the next ping: the count of bytes written
// so far, 8 bytes big-endian. A peer must echo it in its pong (RFC 6455
// §5.5.3).
func (l *liveness) pingPayload() []byte {
	return binary.BigEndian.AppendUint64(nil, uint64(l.written.Load()))
}

// pong takes a pong's payload as proof that the bytes it counts were
// delivered. Other payloads (unsolicited pongs) prove only that the peer
// is there. Reader only.
func (l *liveness) pong(payload []byte) {
	if len(payload) != 8 {
		return
	}
	n := min(int64(binary.BigEndian.Uint64(payload)), l.written.Load())
	if n > l.acked.Load() { // the reader is the only writer of acked
		l.acked.Store(n)
	}
}

// timeUp is when the peer's time runs out, from the counters (timeout set).
func (l *liveness) timeUp() int64 {
	owed := min(max(0, l.written.Load()-l.acked.Load()), maxOwed) + l.incoming.Load()
	return l.heard.Load() + int64(l.timeout+transferTime(0, int(owed)))
}

// deadline computes the read deadline from the counters: the peer's time
// or the next ping, whichever comes first.
func (l *liveness) deadline() int64 {
	ping := l.pingAt.Load()
	if l.timeout <= 0 {
		return ping
	}
	if up := l.timeUp(); ping == 0 || up < ping {
		return up
	}
	return ping
}

// apply sets the socket's read deadline. The reader and the writer both
// set it, so their calls can land out of order: it sets again until the
// deadline it set is the one the counters give, which leaves the latest
// in place.
func (l *liveness) apply() error {
	if l.timeout <= 0 && l.interval <= 0 {
		return nil
	}
	for {
		at := l.deadline()
		if err := l.conn.SetReadDeadline(monoBase.Add(time.Duration(at))); err != nil {
			return err
		}
		l.applied.Store(at)
		if l.deadline() == at {
			return nil
		}
	}
}

// expired is called by the reader when its read deadline has passed, and
// reports whether the peer's time is up. If not, the deadline was the next
// ping (it asks p's writer for one and sets the one after) or one that
// frames or writes have moved since; either way the new deadline is set
// and the reader reads on. Reader only.
func (l *liveness) expired(p *peer) bool {
	now := monoNow()
	if l.timeout > 0 && now >= l.timeUp() {
		return true
	}
	if at := l.pingAt.Load(); at != 0 && now >= at {
		l.pingAt.Store(nextPing(now, l.interval))
		l.pingWanted.Store(true)
		p.tellWriter()
	}
	return l.apply() != nil
}

// writeMessage writes msg as one binary frame within writeWait.
func writeMessage(ws *websocket.Conn, msg []byte) error {
	return writeFrame(ws, websocket.BinaryFrame, msg)
}

// writeFrame writes one frame of type opcode within writeWait, from the
// writer goroutine, the only one that writes to ws or touches
// ws.PayloadType. The deadline is cleared afterwards so that no write can
// ever meet a stale one.
func writeFrame(ws *websocket.Conn, opcode byte, msg []byte) error {
	if err := ws.SetWriteDeadline(time.Now().Add(transferTime(writeWait, len(msg)))); err != nil {
		return err
	}
	defer ws.SetWriteDeadline(time.Time{})
	ws.PayloadType = opcode
	_, err := ws.Write(msg)
	ws.PayloadType = websocket.BinaryFrame
	return err
}

// writeRaw writes b and then more (which may be nil), whole frames, to an
// editor's socket within writeWait plus the time their size takes. The
// deadline is cleared afterwards: left armed, its timer would fire
// writeWait after every write, waking an idle relay for nothing.
func writeRaw(nc net.Conn, b, more []byte) error {
	if err := nc.SetWriteDeadline(time.Now().Add(transferTime(writeWait, len(b)+len(more)))); err != nil {
		return err
	}
	defer nc.SetWriteDeadline(time.Time{})
	if _, err := nc.Write(b); err != nil || len(more) == 0 {
		return err
	}
	_, err := nc.Write(more)
	return err
}

// closeFrame is a server's close frame with code and no reason (RFC 6455
// §5.5.1), as x/net's WriteClose sends it.
func closeFrame(code int) []byte {
	return appendServerFrame(nil, opClose, binary.BigEndian.AppendUint16(nil, uint16(code)))
}

// minTransferRate is the slowest a peer may take a large message, or send
// one: deadlines grant time in proportion to the bytes, so that a big
// document's step 2 over a slow link is not cut off (and then resent in
// full on every reconnect) while a dead peer is still found.
const minTransferRate = 64 << 10 // bytes per second

// transferTime is base plus the time size bytes take at minTransferRate.
func transferTime(base time.Duration, size int) time.Duration {
	return base + time.Duration(size)*time.Second/minTransferRate
}

// writeClose sends a close frame with code within writeWait.
func writeClose(ws *websocket.Conn, code int) error {
	if err := ws.SetWriteDeadline(time.Now().Add(writeWait)); err != nil {
		return err
	}
	defer ws.SetWriteDeadline(time.Time{})
	return ws.WriteClose(code)
}

// frameReader reads the frames of one WebSocket for its reader goroutine:
// an editor's from its socket, with its wireReader; the upstream's through
// x/net/websocket's frame reader. Either way it checks each frame itself
// rather than taking websocket.Message: the library hands on each fragment
// of a fragmented message as a message of its own and hides the FIN bit,
// which would cut a Yjs message in pieces, and its HandleFrame writes pongs
// and close frames from the reader goroutine, with no write deadline of
// ours. Here the first frame that is not a whole binary message ends the
// conn before any of it is passed on, and pings are answered by the writer
// goroutine.
type frameReader struct {
	p      *peer
	in     *wireReader // an editor's read-ahead; nil: frames come through p.ws
	max    int         // largest message accepted, in bytes
	closed bool        // p.closing has been seen: wait p.grace at most, for the answer
	// payload reads the current frame's payload from in.
	payload payloadReader
}

// next returns the payload of the next binary message. Every frame, control
// frames included, proves the peer alive and restarts the idle deadline.
func (r *frameReader) next() ([]byte, error) {
	for {
		if err := r.setDeadline(); err != nil {
			return nil, err
		}
		if r.in != nil && r.in.r == r.in.w {
			// An idle editor's reader waits here, not deeper down: its
			// stack stays small (see serve).
			if err := r.fill(); err != nil {
				return nil, err
			}
		}
		h, payload, err := r.nextFrame()
		if err != nil {
			return nil, err
		}
		control, err := classifyFrame(h.fin, h.opcode, h.size, r.max)
		switch {
		case errors.Is(err, errTextFrame):
			// Skip the payload so that a caller may go on reading.
			if _, err := io.Copy(io.Discard, payload); err != nil {
				return nil, err
			}
			return nil, errTextFrame
		case err != nil:
			return nil, err
		case control:
			if err := r.control(payload, h.opcode, h.size); err != nil {
				return nil, err
			}
			continue
		}
		if !r.closed && h.size > exactRead {
			// A large payload may take longer than the timeout to arrive.
			if err := r.p.live.expect(h.size); err != nil {
				return nil, err
			}
			if err := r.checkClosing(); err != nil {
				return nil, err
			}
		}
		return readPayload(payload, h.size)
	}
}

// nextFrame reads the next frame's header, checked against the side it
// comes from (checkFrameHeader), and returns it with a reader of its
// payload, unmasked.
func (r *frameReader) nextFrame() (frameHeader, io.Reader, error) {
	if r.in != nil {
		return r.wireFrame()
	}
	fr, err := r.p.ws.NewFrameReader()
	if err != nil {
		return frameHeader{}, nil, err
	}
	var hdr [maxFrameHeader]byte
	n := 0
	if h := fr.HeaderReader(); h != nil {
		n, _ = io.ReadFull(h, hdr[:])
	}
	h, err := parseFrameHeader(hdr[:n])
	if err == nil {
		err = checkFrameHeader(hdr[:n], r.p.ws.IsServerConn())
	}
	return h, fr, err // fr has unmasked the payload already
}

// wireFrame reads an editor's next frame header from its socket.
func (r *frameReader) wireFrame() (frameHeader, io.Reader, error) {
	if err := r.need(2); err != nil {
		return frameHeader{}, nil, err
	}
	in := r.in
	if err := r.need(frameHeaderLen(in.buf[in.r+1])); err != nil {
		return frameHeader{}, nil, err
	}
	hdr := in.buf[in.r : in.r+frameHeaderLen(in.buf[in.r+1])]
	in.r += len(hdr)
	h, err := parseFrameHeader(hdr)
	if err == nil {
		err = checkFrameHeader(hdr, true)
	}
	r.payload = payloadReader{r: r, left: h.size, mask: h.mask}
	return h, &r.payload, err
}

// setDeadline restarts the idle deadline, or, once closing is closed, sets
// the grace deadline once and leaves it.
func (r *frameReader) setDeadline() error {
	if r.closed {
		return nil
	}
	if err := r.p.live.heardFrame(); err != nil {
		return err
	}
	return r.checkClosing()
}

// checkClosing, called after any deadline the reader sets, applies the
// grace deadline once closing is closed (see endReader for the order).
func (r *frameReader) checkClosing() error {
	select {
	case <-r.p.closing:
		r.closed = true
		return r.p.live.conn.SetReadDeadline(time.Now().Add(r.p.grace))
	default:
		return nil
	}
}

// keepWaiting reports whether an editor's read that failed with err may
// go on: its deadline passed, but only the next ping was due or the
// deadline had moved since (liveness.expired), or the close frame has
// gone out meanwhile and the grace for the answer starts now.
func (r *frameReader) keepWaiting(err error) bool {
	switch {
	case !errors.Is(err, os.ErrDeadlineExceeded), r.closed:
		return false
	case r.p.closed():
		return r.checkClosing() == nil
	}
	if r.in.r == r.in.w {
		r.in.full = false // a quiet socket: wait with the small buffer
	}
	return !r.p.live.expired(r.p)
}

// control handles a control frame: a close is handed to the writer to
// answer and ends the reader (a *peerCloseError), a ping is handed to the
// writer, a pong proves the peer alive and what it has received.
func (r *frameReader) control(fr io.Reader, opcode byte, size int) error {
	payload, err := readPayload(fr, size)
	if err != nil {
		return err
	}
	switch opcode {
	case opClose:
		pc, err := parseClose(payload)
		if err != nil {
			return err
		}
		pc.answer = r.closed || r.p.closed()
		select {
		case r.p.echo <- echoCode(pc.code):
			r.p.tellWriter()
		default: // answered already
		}
		return pc
	case opPing:
		answerLatest(r.p.pongs, payload)
		r.p.tellWriter()
	case opPong:
		r.p.live.pong(payload)
	}
	return nil
}

// answerLatest puts payload on pongs (room for one) in place of a ping
// still waiting there: with two pings pending, a pong answers the latest
// (RFC 6455 §5.5.3). The reader is the only sender, so the send after the
// drain never blocks.
func answerLatest(pongs chan []byte, payload []byte) {
	select {
	case <-pongs:
	default:
	}
	pongs <- payload
}

// Sizes of an editor's read-ahead buffer, in bytes: readBuffer while frames
// arrive, idleRead while it waits for the next. idleRead holds a whole
// frame header (maxFrameHeader) and a pong.
const (
	readBuffer = 4 << 10
	idleRead   = 16
)

// readBuffers holds the read-ahead buffers of editors whose frames are
// arriving now.
var readBuffers = sync.Pool{New: func() any { b := make([]byte, readBuffer); return &b }}

// wireReader is an editor's read-ahead, owned by its reader goroutine. The
// relay reads an editor's frames from the socket itself, so that no buffer
// of net/http's or x/net's stays with the connection. While bytes keep
// coming (the last read filled its buffer) it reads into a pooled buffer
// of readBuffer bytes; once it has used up what it read and the socket
// gave less than it could take, it gives the buffer back and waits for the
// next bytes with a read into idle. The rest of a payload too large for
// the buffer is read straight into the message.
type wireReader struct {
	buf    []byte  // unread bytes are buf[r:w]
	r, w   int     // read and write offsets in buf
	pooled *[]byte // the pooled buffer that buf is; nil: none
	full   bool    // the last read filled what it was given: more bytes may wait
	idle   [idleRead]byte
}

// room returns where the next read goes, with space for at least one
// byte: an empty buffer is chosen anew (pooled while bytes keep coming,
// else idle), and unread bytes move to the front, or to a pooled buffer,
// when there is no space behind them.
func (in *wireReader) room() []byte {
	switch {
	case in.r == in.w:
		in.r, in.w = 0, 0
		if in.full {
			in.usePooled()
		} else {
			in.useIdle()
		}
	case in.w < len(in.buf):
	case in.r > 0:
		in.w = copy(in.buf, in.buf[in.r:in.w])
		in.r = 0
	default: // the small buffer is full of a header's first bytes
		in.usePooled()
	}
	return in.buf[in.w:]
}

// usePooled moves the unread bytes to a pooled buffer, unless buf is one.
func (in *wireReader) usePooled() {
	if in.pooled != nil {
		return
	}
	p := readBuffers.Get().(*[]byte)
	n := copy(*p, in.buf[in.r:in.w])
	in.buf, in.pooled, in.r, in.w = *p, p, 0, n
}

// useIdle makes the small buffer the one to read into; buf must be empty.
func (in *wireReader) useIdle() {
	in.release()
	in.buf = in.idle[:]
}

// release gives the pooled buffer back, if buf is one; the reader calls
// it once more when the connection ends.
func (in *wireReader) release() {
	if in.pooled != nil {
		readBuffers.Put(in.pooled)
		in.pooled, in.buf, in.r, in.w = nil, nil, 0, 0
	}
}

// need reads until the read-ahead holds n unread bytes, n at most
// maxFrameHeader.
func (r *frameReader) need(n int) error {
	for r.in.w-r.in.r < n {
		if err := r.fill(); err != nil {
			return err
		}
	}
	return nil
}

// fill reads at least one more byte into the read-ahead. A read whose
// deadline passed only for a ping goes on (keepWaiting), in a buffer
// chosen anew.
func (r *frameReader) fill() error {
	for {
		room := r.in.room()
		n, err := r.p.nc.Read(room)
		r.in.w += n
		r.in.full = n == len(room)
		if n > 0 {
			return nil
		}
		if err != nil && !r.keepWaiting(err) {
			return err
		}
	}
}

// payloadReader reads the payload of the frame whose header an editor's
// frameReader has just read, and unmasks it (RFC 6455 §5.3).
type payloadReader struct {
	r    *frameReader
	left int // payload bytes not read yet
	pos  int // payload bytes read so far
	mask [4]byte
}

// Read reads payload bytes into p: what the read-ahead holds; else, for a
// p as large as the pooled buffer or larger, straight from the socket;
// else through the read-ahead.
func (pr *payloadReader) Read(p []byte) (int, error) {
	if pr.left <= 0 {
		return 0, io.EOF
	}
	p = p[:min(len(p), pr.left)]
	r, in := pr.r, pr.r.in
	var n int
	if in.r == in.w && len(p) >= readBuffer {
		var err error
		if n, err = r.readSocket(p); err != nil {
			return 0, err
		}
	} else {
		if in.r == in.w {
			if err := r.fill(); err != nil {
				return 0, err
			}
		}
		n = copy(p, in.buf[in.r:in.w])
		in.r += n
	}
	maskBytes(pr.mask, pr.pos, p[:n])
	pr.pos += n
	pr.left -= n
	return n, nil
}

// readSocket reads into p straight from an editor's socket, at least one
// byte, going on after a deadline that passed only for a ping.
func (r *frameReader) readSocket(p []byte) (int, error) {
	for {
		n, err := r.p.nc.Read(p)
		if n > 0 {
			r.in.full = n == len(p)
			return n, nil
		}
		if err != nil && !r.keepWaiting(err) {
			return 0, err
		}
	}
}

// exactRead is the payload size up to which readPayload allocates at once.
const exactRead = 64 << 10

// readPayload reads a frame's size bytes. Beyond exactRead the buffer
// grows as the bytes arrive, doubling each time the peer has filled it
// (and never past size), so that a 14-byte header cannot make the relay
// allocate --max-message bytes for a payload that never comes; the result
// has no spare capacity, as it waits in queues. Errors: the reader's, and
// io.ErrUnexpectedEOF for a payload cut short.
func readPayload(payload io.Reader, size int) ([]byte, error) {
	data := make([]byte, min(size, exactRead))
	got := 0
	for {
		n, err := io.ReadFull(payload, data[got:])
		got += n
		switch {
		case err == io.EOF: // the header promised more
			return data[:got], io.ErrUnexpectedEOF
		case err != nil:
			return data[:got], err
		case got == size:
			return data, nil
		}
		bigger := make([]byte, min(size, 2*len(data)))
		copy(bigger, data)
		data = bigger
	}
}
