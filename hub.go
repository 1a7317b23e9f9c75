package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
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
	// writeWait bounds one write to a peer; a peer that takes longer is dead
	// or too slow to keep, and its conn is closed.
	writeWait = 10 * time.Second
	// closeGrace is how long a closing conn waits for the peer's close frame
	// before it drops the TCP connection.
	closeGrace = time.Second
	// warnEvery is the least time between two log lines of one repeated kind.
	warnEvery = 10 * time.Second
)

// WebSocket close codes (RFC 6455 §7.4.1) that the relay sends.
const (
	closeNormal      = 1000
	closeGoingAway   = 1001
	closeProtocol    = 1002
	closeUnsupported = 1003
	closeTooBig      = 1009
	closeTryAgain    = 1013
)

var (
	errTextFrame  = errors.New("text frame: Yjs messages are binary")
	errFragmented = errors.New("fragmented message: not supported")
	errTooLarge   = errors.New("message larger than --max-message")
	errBadOpcode  = errors.New("reserved websocket opcode")
	errStopping   = errors.New("relay stopping")
)

// queryAwareness asks a Yjs client for every awareness state it knows. The
// slice is shared by every queue it is put on and never modified.
var queryAwareness = []byte{msgQueryAwareness}

// frame is one Yjs message on its way through the hub. data is never
// modified once a reader has handed it on, so the hub shares it between all
// recipients without copying.
type frame struct {
	doc  string
	data []byte
	kind uint64 // Yjs message type, checked by the reader
	from *conn  // local sender; nil for frames from the upstream
}

// conn is one local editor's WebSocket. readLoop and writeLoop own the two
// directions of ws; the hub owns membership and alone closes send.
type conn struct {
	// Static after construction.
	doc    string
	remote string
	ws     *websocket.Conn
	log    *slog.Logger  // carries doc and remote
	send   chan []byte   // closed by the hub only
	done   chan struct{} // closed when writeLoop returns

	// closeCode is written by the hub just before it closes send and read by
	// writeLoop after send is closed, so the channel close orders the two.
	closeCode int
}

// departure tells the hub that a conn's reader has ended, and why.
type departure struct {
	c    *conn
	code int
}

// hub routes frames between the local editors of each document and the
// upstream. Readers send to it; it never blocks on a send of its own.
type hub struct {
	// Static after construction.
	join       chan *conn
	leave      chan departure
	local      chan frame // from conn readers
	remote     chan frame // from the upstream reader
	attach     chan *link // a new upstream connection is up
	detach     chan *link // an upstream connection has ended
	quit       chan struct{}
	connQueue  int
	maxMessage int
	log        *slog.Logger

	// Owned by run.
	docs        map[string]map[*conn]struct{}
	up          *link // nil while the upstream is down
	unknownDoc  throttle
	notSentUp   throttle
	slowClosing throttle
}

// newHub returns a hub whose conns queue up to queue frames and whose readers
// accept messages of up to maxMessage bytes.
func newHub(queue, maxMessage int, log *slog.Logger) *hub {
	return &hub{
		join:       make(chan *conn),
		leave:      make(chan departure),
		local:      make(chan frame, inboxQueue),
		remote:     make(chan frame, inboxQueue),
		attach:     make(chan *link),
		detach:     make(chan *link),
		quit:       make(chan struct{}),
		connQueue:  queue,
		maxMessage: maxMessage,
		log:        log,
		docs:       make(map[string]map[*conn]struct{}),
	}
}

// run is the hub goroutine: the only code that touches h.docs and h.up.
// It returns when ctx is done, after closing every conn's send and the
// upstream link's send; h.quit is closed then so that readers stop waiting.
func (h *hub) run(ctx context.Context) {
	defer close(h.quit)
	for {
		select {
		case <-ctx.Done():
			h.closeAll()
			return
		case c := <-h.join:
			h.add(c)
		case d := <-h.leave:
			h.remove(d.c, d.code)
		case f := <-h.local:
			h.fromLocal(f)
		case f := <-h.remote:
			h.fromUpstream(f)
		case l := <-h.attach:
			h.attachLink(l)
		case l := <-h.detach:
			h.detachLink(l)
		}
	}
}

// add registers c with its document. The document's other editors are asked
// for their awareness so that the newcomer sees who is there at once rather
// than at their next renewal, up to 15 s later.
func (h *hub) add(c *conn) {
	conns := h.docs[c.doc]
	if conns == nil {
		conns = make(map[*conn]struct{})
		h.docs[c.doc] = conns
	}
	for other := range conns {
		h.queue(other, queryAwareness)
	}
	conns[c] = struct{}{}
}

// remove unregisters c and closes its send so that its writer says goodbye
// with code. Removing a conn that is already gone does nothing.
func (h *hub) remove(c *conn, code int) {
	conns := h.docs[c.doc]
	if _, ok := conns[c]; !ok {
		return
	}
	delete(conns, c)
	if len(conns) == 0 {
		delete(h.docs, c.doc)
	}
	c.closeCode = code
	close(c.send)
}

// fromLocal passes a local editor's message to the document's other editors
// and upstream. Sync messages never go back to their sender; awareness
// messages do, as the reference Yjs server does: a lone y-websocket client
// that hears nothing for 30 s drops and re-opens its socket.
func (h *hub) fromLocal(f frame) {
	for c := range h.docs[f.doc] {
		if c == f.from && f.kind != msgAwareness {
			continue
		}
		h.queue(c, f.data)
	}
	h.toUpstream(f)
}

// fromUpstream passes a message from the upstream to every local editor of
// its document.
func (h *hub) fromUpstream(f frame) {
	conns := h.docs[f.doc]
	if len(conns) == 0 {
		if n, ok := h.unknownDoc.hit(time.Now()); ok {
			h.log.Info("upstream messages for a document without local editors dropped", "doc", f.doc, "count", n)
		}
		return
	}
	for c := range conns {
		h.queue(c, f.data)
	}
}

// queue gives data to c without blocking. A full queue closes c as a slow
// consumer: never skip a frame inside a conn that stays open.
func (h *hub) queue(c *conn, data []byte) {
	select {
	case c.send <- data:
	default:
		if n, ok := h.slowClosing.hit(time.Now()); ok {
			c.log.Warn("slow editor closed: send queue full", "queue", cap(c.send), "count", n)
		}
		h.remove(c, closeTryAgain)
	}
}

// toUpstream queues f for the upstream writer without blocking. A full queue
// closes the upstream connection, which then reconnects.
func (h *hub) toUpstream(f frame) {
	if h.up == nil {
		if n, ok := h.notSentUp.hit(time.Now()); ok {
			h.log.Info("upstream down: local messages stay local", "doc", f.doc, "count", n)
		}
		return
	}
	select {
	case h.up.send <- f:
	default:
		h.log.Warn("upstream send queue full: reconnecting", "queue", cap(h.up.send))
		h.closeLink()
	}
}

// attachLink makes l the upstream connection that frames go to.
func (h *hub) attachLink(l *link) {
	if h.up != nil {
		h.closeLink()
	}
	h.up = l
}

// detachLink forgets l if it is still the current upstream connection.
func (h *hub) detachLink(l *link) {
	if h.up == l {
		h.closeLink()
	}
}

// closeLink closes the current link's send; its writer flushes what is
// queued and closes the connection.
func (h *hub) closeLink() {
	close(h.up.send)
	h.up = nil
}

// closeAll closes every conn with "going away" and the upstream link.
func (h *hub) closeAll() {
	for _, conns := range h.docs {
		for c := range conns {
			h.remove(c, closeGoingAway)
		}
	}
	if h.up != nil {
		h.closeLink()
	}
}

// serve runs one upgraded local WebSocket until either side ends it. The
// websocket library closes the TCP connection when serve returns.
func (h *hub) serve(ws *websocket.Conn, doc string) {
	ws.PayloadType = websocket.BinaryFrame
	remote := ws.Request().RemoteAddr
	c := &conn{
		doc:    doc,
		remote: remote,
		ws:     ws,
		log:    h.log.With("doc", doc, "remote", remote),
		send:   make(chan []byte, h.connQueue),
		done:   make(chan struct{}),
	}
	select {
	case h.join <- c:
	case <-h.quit:
		c.goodbye(closeGoingAway)
		return
	}
	c.log.Info("editor connected")
	go c.writeLoop()
	code, err := c.readLoop(h)
	select {
	case h.leave <- departure{c, code}:
	case <-h.quit:
	}
	<-c.done
	c.log.Info("editor disconnected", "code", c.closeCode, "reason", err)
}

// readLoop is the conn's reader: it hands every well-formed message to the
// hub. It returns the close code to answer with and the reason it ended.
func (c *conn) readLoop(h *hub) (int, error) {
	var malformed throttle
	debug := c.log.Enabled(context.Background(), slog.LevelDebug)
	for {
		data, err := readMessage(c.ws, h.maxMessage)
		if err != nil {
			return closeCodeFor(err), err
		}
		kind, err := messageKind(data)
		if err != nil {
			if n, ok := malformed.hit(time.Now()); ok {
				c.log.Warn("malformed message dropped", "bytes", len(data), "count", n, "err", err)
			}
			continue
		}
		if debug {
			c.log.Debug("message from editor", "kind", kind, "bytes", len(data))
		}
		select {
		case h.local <- frame{doc: c.doc, data: data, kind: kind, from: c}:
		case <-h.quit:
			return closeGoingAway, errStopping
		}
	}
}

// writeLoop is the conn's writer, the only code that writes frames to c.ws.
// After a failed write it keeps draining send, so the hub never sees this
// dead conn as slow, until the hub closes send.
func (c *conn) writeLoop() {
	defer close(c.done)
	alive := true
	for msg := range c.send {
		if !alive {
			continue
		}
		if err := writeMessage(c.ws, msg); err != nil {
			c.log.Debug("write to editor failed", "err", err)
			alive = false
			c.ws.SetReadDeadline(time.Now()) // ends readLoop
		}
	}
	if alive {
		c.goodbye(c.closeCode)
	}
}

// goodbye sends a close frame with code and gives the peer closeGrace to
// answer before the reader gives up.
func (c *conn) goodbye(code int) {
	c.ws.SetWriteDeadline(time.Now().Add(writeWait))
	c.ws.WriteClose(code)
	c.ws.SetReadDeadline(time.Now().Add(closeGrace))
}

// writeMessage writes msg as one binary frame within writeWait.
func writeMessage(ws *websocket.Conn, msg []byte) error {
	if err := ws.SetWriteDeadline(time.Now().Add(writeWait)); err != nil {
		return err
	}
	_, err := ws.Write(msg)
	return err
}

// readMessage returns the payload of the next binary message on ws, reading
// frames itself rather than through websocket.Message: the library hands on
// each fragment of a fragmented message as a message of its own and hides the
// FIN bit, which would cut a Yjs message in pieces. Here the first frame that
// is not a whole binary message ends the conn before any of it is passed on.
// Ping and pong frames are answered or dropped inside HandleFrame.
func readMessage(ws *websocket.Conn, max int) ([]byte, error) {
	for {
		fr, err := ws.NewFrameReader()
		if err != nil {
			return nil, err
		}
		var hdr [14]byte // the longest header: 2 + 8 length + 4 mask bytes
		n := 0
		if r := fr.HeaderReader(); r != nil {
			n, _ = io.ReadFull(r, hdr[:])
		}
		if n < 2 {
			return nil, errBadOpcode
		}
		fin, opcode := hdr[0]&0x80 != 0, hdr[0]&0x0f
		size := fr.Len() - n
		payload, err := ws.HandleFrame(fr)
		if err != nil {
			return nil, err
		}
		if payload == nil {
			continue // control frame, already handled
		}
		switch {
		case opcode == websocket.ContinuationFrame || !fin:
			return nil, errFragmented
		case size > max || size < 0:
			return nil, errTooLarge
		case opcode == websocket.TextFrame:
			// Skip the payload so that a caller may go on reading.
			if _, err := io.Copy(io.Discard, payload); err != nil {
				return nil, err
			}
			return nil, errTextFrame
		case opcode != websocket.BinaryFrame:
			return nil, errBadOpcode
		}
		data := make([]byte, size)
		if _, err := io.ReadFull(payload, data); err != nil {
			return nil, err
		}
		return data, nil
	}
}

// closeCodeFor maps the reason a reader ended to the close code it answers with.
func closeCodeFor(err error) int {
	switch {
	case errors.Is(err, errTextFrame), errors.Is(err, errFragmented):
		return closeUnsupported
	case errors.Is(err, errTooLarge):
		return closeTooBig
	case errors.Is(err, errBadOpcode):
		return closeProtocol
	}
	return closeNormal
}

// throttle lets one repeated log line through at most once per warnEvery
// and counts the events in between. Each throttle is owned by one goroutine.
type throttle struct {
	count int
	last  time.Time
}

// hit counts one event. It reports whether to log now and, if so, how many
// events the line stands for.
func (t *throttle) hit(now time.Time) (n int, ok bool) {
	t.count++
	if !t.last.IsZero() && now.Sub(t.last) < warnEvery {
		return 0, false
	}
	n, t.count, t.last = t.count, 0, now
	return n, true
}
