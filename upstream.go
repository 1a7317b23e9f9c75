package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/websocket"
)

const (
	// upstreamQueue frames may wait for the upstream writer. It is larger
	// than connQueue because it carries every document; when it is full the
	// hub closes the upstream connection, which then reconnects.
	upstreamQueue = 4096
	// dialTimeout bounds the TCP (and TLS) connect plus the WebSocket handshake.
	dialTimeout = 10 * time.Second
	// backoffBase is the first reconnect delay bound; it doubles per attempt.
	backoffBase = 500 * time.Millisecond
	// defaultRetryMax is the largest reconnect delay bound (--retry-max).
	defaultRetryMax = 30 * time.Second
	// stableAfter is how long a connection must stay up to reset the backoff,
	// so a server that accepts and drops at once is not hammered.
	stableAfter = 10 * time.Second
	// upstreamCloseGrace is how long the upstream reader waits for the
	// server's answer to the relay's close frame: the server may still be
	// reading a long flushed queue, and closing the socket under unread
	// bytes would reset it and lose the queue's tail.
	upstreamCloseGrace = 4 * time.Second
	// maxErrorBody bytes of a refused handshake's body go into the error.
	maxErrorBody = 512
	// maxKeptHandshake bounds the response bytes kept to report a refusal.
	maxKeptHandshake = 64 << 10
	// upstreamSlack is what an upstream frame may carry beyond --max-message:
	// the ID prefix of a document name.
	upstreamSlack = 64 << 10
)

// errAuth marks an upstream refusal that retrying cannot fix.
var errAuth = errors.New("upstream authentication failed")

// upstreamMode is the upstream side as main runs it, whatever its
// protocol: it connects, hands the hub the upstreamLink of its live
// connection (attach, detach: one link at a time, a new attach replaces the
// old), passes what the server sends to the hub (hub.fromServer), and
// returns nil when ctx ends or an error that retrying cannot fix. The hub
// knows only the link; yjs mode attaches its dispatcher's.
type upstreamMode interface {
	run(ctx context.Context) error
}

// upstream is the ELVA mode (upstreamMode): ONE WebSocket to the server carries
// every document, each frame behind an ID prefix (PROTOCOL.md §2), and it
// reconnects with backoff until ctx ends. Sockets: serve owns each one and
// closes it; its reader goroutine reads it, its pump writes it.
type upstream struct {
	// Static after construction.
	url        *url.URL // without userinfo
	user       string
	password   string
	magic      idMagic
	maxMessage int
	keepalive  keepalive
	retryMax   time.Duration // the cap of the backoff bounds
	tls        *tls.Config   // nil: system roots
	hub        *hub
	log        *slog.Logger
	// handshakeTimeout bounds one dial and upgrade; 0: dialTimeout.
	handshakeTimeout time.Duration
	framing          framing
	target           linkTarget   // takes each connection's link
	path             string       // the request path, escaped; "": url's
	inbox            chan<- frame // where the reader's frames go; nil: hub.fromServer
	// perDocument marks a connection of one document (yjs mode): a 401
	// refuses that document, not the relay, and credentials go with the
	// first handshake (set in authorization) rather than after a 401 per
	// document.
	perDocument bool
	dialSlots   chan struct{} // a token per dial in progress, shared; nil: no limit
	// stats is what the status page tells of the connections, shared by
	// every copy of this upstream (yjs mode: one per document); nil: none
	// kept.
	stats *upstreamStats

	// Owned by run.
	authorization string // Basic credentials, once the server asked for them
	accepted      bool   // the server has accepted authorization before
}

// statusError is a handshake that the server refused with an HTTP status.
type statusError struct {
	code int
	body string
}

func (e *statusError) Error() string {
	msg := fmt.Sprintf("server answered HTTP %d %s", e.code, http.StatusText(e.code))
	if e.body != "" {
		msg += fmt.Sprintf(": %q", e.body)
	}
	return msg
}

// run connects and serves the upstream until ctx ends, which returns nil,
// or until the server refuses the credentials, which returns an errAuth.
func (u *upstream) run(ctx context.Context) error {
	b := backoff{max: u.retryMax}
	var downSince time.Time // zero while up
	var lastReason string   // why the last attempt failed, as logged at warn
	served := false         // a connection was up before: the next is a reconnect
	for {
		ws, raw, err := u.connect(ctx)
		if errors.Is(err, errAuth) {
			return err
		}
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			u.stats.failed(err)
			delay := b.next()
			if downSince.IsZero() {
				downSince = time.Now()
			}
			// One warning per outage and per change of reason (refused,
			// a status, a certificate): retries that fail alike are debug.
			if reason := failureReason(err); reason != lastReason {
				u.log.Warn("upstream unavailable; retrying in the background", "server", u.url.String(), "err", err)
				lastReason = reason
			}
			u.log.Debug("upstream retry scheduled", "delay", delay, "err", err)
			if !sleep(ctx, delay) {
				return nil
			}
			continue
		}
		start := time.Now()
		var outage time.Duration
		if !downSince.IsZero() {
			outage = start.Sub(downSince)
		}
		downSince, lastReason = time.Time{}, ""
		u.stats.up(served)
		served = true
		err = u.serve(ws, raw, outage)
		u.stats.down()
		if ctx.Err() != nil {
			return nil
		}
		u.stats.lost(err)
		if time.Since(start) >= stableAfter {
			b.reset()
		}
		u.log.Warn("upstream connection lost; reconnecting", "server", u.url.String(), "err", err)
		downSince = time.Now()
		delay := b.next()
		u.log.Debug("upstream retry scheduled", "delay", delay)
		if !sleep(ctx, delay) {
			return nil
		}
	}
}

// upstreamStats tells the status page and the metrics about the upstream
// connections: written by their goroutines, read by HTTP handlers, so
// atomics only. A nil *upstreamStats counts nothing.
type upstreamStats struct {
	open       atomic.Int64 // connections up now (yjs mode: one per document)
	since      atomic.Int64 // Unix ns since when one has been up; 0: none is
	connects   atomic.Int64 // connections made, in all
	reconnects atomic.Int64 // connections made after one was lost
	failures   atomic.Int64 // attempts that failed
	lastError  atomic.Pointer[string]
	lastClose  atomic.Int64 // close code of the last lost connection; 1006: without a close frame
	// troubled: the last news was a failed attempt or a lost
	// connection, not a connection made.
	troubled atomic.Bool
}

// state names the upstream's state for the status: "connected" (a
// connection is up), "connecting" (none has been tried to the end yet),
// "disconnected" (the last news was a loss or a failed attempt) or "idle"
// (yjs, hocuspocus: every document's connection was closed after its
// grace).
func (s *upstreamStats) state() string {
	switch {
	case s.open.Load() > 0:
		return "connected"
	case s.troubled.Load():
		return "disconnected"
	case s.connects.Load() > 0:
		return "idle"
	}
	return "connecting"
}

// up counts a connection that came up; again: one was up before.
func (s *upstreamStats) up(again bool) {
	if s == nil {
		return
	}
	s.connects.Add(1)
	s.troubled.Store(false)
	if again {
		s.reconnects.Add(1)
	}
	if s.open.Add(1) == 1 {
		s.since.Store(time.Now().UnixNano())
	}
}

// down counts a connection that ended, whatever ended it.
func (s *upstreamStats) down() {
	if s == nil {
		return
	}
	since := s.since.Load()
	if s.open.Add(-1) == 0 {
		// Not Store(0): a connection that came up meanwhile has set its own.
		s.since.CompareAndSwap(since, 0)
	}
}

// failed notes an attempt that failed with err (already redacted).
func (s *upstreamStats) failed(err error) {
	if s == nil {
		return
	}
	s.failures.Add(1)
	s.troubled.Store(true)
	msg := err.Error()
	s.lastError.Store(&msg)
}

// lost notes a connection that ended with err while the relay runs (the
// server closed it, it broke, or the relay closed it to start again after
// a full queue), and the close code: the server's (RFC 6455 §7.1.5), or
// 1006 when none came.
func (s *upstreamStats) lost(err error) {
	if s == nil {
		return
	}
	s.troubled.Store(true)
	code := int64(closeAbnormal)
	var pc *peerCloseError
	if errors.As(err, &pc) {
		code = int64(pc.code)
	}
	s.lastClose.Store(code)
	if err != nil {
		msg := err.Error()
		s.lastError.Store(&msg)
	}
}

// failureReason sorts a failed attempt for the log: the same reason
// twice in a row is not worth a second warning.
func failureReason(err error) string {
	var status *statusError
	var certErr *tls.CertificateVerificationError
	var netErr net.Error
	switch {
	case errors.As(err, &status):
		return fmt.Sprintf("HTTP %d", status.code)
	case errors.As(err, &certErr):
		return "certificate"
	case errors.As(err, &netErr) && netErr.Timeout():
		return "timeout"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	}
	return "other"
}

// connect makes one handshake, and a second one with Basic credentials when
// the first is refused with 401 and a user is configured.
func (u *upstream) connect(ctx context.Context) (*websocket.Conn, net.Conn, error) {
	ws, raw, err := u.handshake(ctx)
	var status *statusError
	if !errors.As(err, &status) || status.code != http.StatusUnauthorized {
		return ws, raw, err
	}
	switch {
	case u.perDocument:
		// One document refused: the others and the relay go on, and this
		// one is retried with backoff (the refusal is logged).
		return nil, nil, fmt.Errorf("document refused with 401, retrying (check --user and the password): %w", err)
	case u.user == "":
		return nil, nil, fmt.Errorf("%w: the server asks for credentials and no user is set (--user, ELVA_USER): %v", errAuth, err)
	case u.accepted:
		// These credentials worked before: a server that restarts may
		// refuse them for a while, and a relay that has served for days
		// should not die of it. Retry; the refusal is logged.
		return nil, nil, fmt.Errorf("credentials for user %q refused on reconnect, retrying: %w", u.user, err)
	case u.authorization != "":
		return nil, nil, fmt.Errorf("%w for user %q: %v", errAuth, u.user, err)
	}
	u.authorization = basicAuth(u.user, u.password)
	ws, raw, err = u.handshake(ctx)
	if errors.As(err, &status) && status.code == http.StatusUnauthorized {
		return nil, nil, fmt.Errorf("%w for user %q: %v", errAuth, u.user, err)
	}
	if err == nil {
		u.accepted = true
	}
	return ws, raw, err
}

// handshake dials the server and upgrades the connection within
// u.handshakeTimeout (dialTimeout when 0). It dials itself rather than
// through websocket.DialConfig so that a refusal can be reported with its
// HTTP status and body, which the library's ErrBadStatus hides. It returns
// the WebSocket and raw, the TCP (or TLS) connection under it, to close it
// without a second close frame; errors: the dial's, a *statusError for a
// refusal, or the context's when the relay stops.
func (u *upstream) handshake(ctx context.Context) (*websocket.Conn, net.Conn, error) {
	timeout := u.handshakeTimeout
	if timeout <= 0 {
		timeout = dialTimeout
	}
	if u.dialSlots != nil { // the wait for a slot is not the handshake's time
		select {
		case u.dialSlots <- struct{}{}:
			defer func() { <-u.dialSlots }()
		case <-ctx.Done():
			return nil, nil, fmt.Errorf("waiting for a dial slot: %w", ctx.Err())
		}
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	raw, err := u.dial(ctx)
	var certErr *tls.CertificateVerificationError
	if errors.As(err, &certErr) {
		return nil, nil, fmt.Errorf("TLS certificate of %s rejected: %w (a private CA goes in --ca-file)", u.url.Host, certErr.Err)
	}
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Op == "dial" {
		return nil, nil, err // it names the address already: "dial tcp HOST:PORT: …"
	}
	if err != nil {
		return nil, nil, fmt.Errorf("dial %s: %w", u.url.Host, err)
	}
	// The deadline bounds the handshake; closing on cancel ends it at a
	// stop. The callback runs on another goroutine: it closes over conn,
	// which nothing assigns again, never over a result that a return
	// statement overwrites (that was a nil-pointer crash).
	conn := raw
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	ws, err := u.upgrade(conn)
	if !stop() && err == nil {
		// The callback ran or runs: the connection is closed under ws.
		err = fmt.Errorf("websocket handshake with %s: %w", u.url.Host, ctx.Err())
	}
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	conn.SetDeadline(time.Time{})
	ws.PayloadType = websocket.BinaryFrame
	return ws, conn, nil
}

// upgrade runs the client side of the WebSocket handshake on conn. A
// refusal comes back as a *statusError with the server's status and body
// (credentials scrubbed); the caller closes conn on any error.
func (u *upstream) upgrade(conn net.Conn) (*websocket.Conn, error) {
	cfg, err := websocket.NewConfig(u.url.String(), u.origin())
	if err != nil {
		return nil, fmt.Errorf("upstream config: %w", err)
	}
	if u.authorization != "" {
		cfg.Header = http.Header{"Authorization": {u.authorization}}
	}
	if u.path != "" {
		// Opaque is what x/net writes as the request target, unchanged:
		// the path's own escaping would turn a literal % into %25.
		cfg.Location.Opaque = u.path
	}
	rec := &recordingConn{Conn: conn, recording: true}
	ws, err := websocket.NewClient(cfg, rec)
	if errors.Is(err, websocket.ErrBadStatus) {
		return nil, u.redact(readRefusal(rec.kept, conn))
	}
	if err != nil {
		return nil, fmt.Errorf("websocket handshake with %s: %s", u.url.Host, shorten(err.Error(), maxErrorBody))
	}
	rec.recording, rec.kept = false, nil
	return ws, nil
}

// basicAuth is the Authorization header value of HTTP Basic auth.
func basicAuth(user, password string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+password))
}

// redact removes the credentials from a refusal's body: a proxy that
// echoes the request would otherwise put them into the log.
func (u *upstream) redact(err error) error {
	var status *statusError
	if !errors.As(err, &status) {
		return err
	}
	for _, secret := range []string{u.authorization, strings.TrimPrefix(u.authorization, "Basic "), u.password} {
		if secret != "" {
			status.body = strings.ReplaceAll(status.body, secret, "[redacted]")
		}
	}
	return status
}

// dial opens the TCP connection, with TLS for wss.
func (u *upstream) dial(ctx context.Context) (net.Conn, error) {
	d := &net.Dialer{KeepAlive: 30 * time.Second}
	if u.url.Scheme != "wss" {
		return d.DialContext(ctx, "tcp", hostPort(u.url))
	}
	cfg := u.tls.Clone()
	if cfg == nil {
		cfg = &tls.Config{}
	}
	cfg.ServerName = u.url.Hostname()
	td := &tls.Dialer{NetDialer: d, Config: cfg}
	return td.DialContext(ctx, "tcp", hostPort(u.url))
}

// origin is the Origin header that x/net/websocket requires of a client:
// the server's own origin, which servers that check it accept.
func (u *upstream) origin() string {
	scheme := "http"
	if u.url.Scheme == "wss" {
		scheme = "https"
	}
	return scheme + "://" + u.url.Host
}

// serve runs one upstream connection until it ends: the reader here, the
// writer (pump) in its own goroutine. It returns why the connection ended.
// outage is how long the upstream was down before (0: it was not), for the
// log. The socket is owned by serve: it closes raw once both goroutines
// are done with it.
func (u *upstream) serve(ws *websocket.Conn, raw net.Conn, outage time.Duration) error {
	l := &upstreamLink{send: make(chan frame, upstreamQueue), overhead: u.framing.overhead}
	if !u.target.attachLink(l) {
		raw.Close()
		return errStopping
	}
	p := newPeer(ws, u.log, u.keepalive)
	p.raw, p.grace = raw, upstreamCloseGrace
	go pump(&p, l.send, u.framing.encoder(), func(f frame) { l.backlog.done(len(f.data)) })
	// Logged once the hub sends frames here and the writer runs, so the
	// line means "in use".
	if outage > 0 {
		u.log.Info("upstream connected", "server", u.url.String(), "after_outage", outage.Round(time.Millisecond))
	} else {
		u.log.Info("upstream connected", "server", u.url.String())
	}
	err := u.readLoop(frameReader{p: &p, max: u.maxMessage + upstreamSlack})
	if isPeerClose(err) {
		// The writer answers the server's close (RFC 6455 §5.5.1) before
		// the socket goes: else the server sees 1006.
		awaitClosed(&p)
	}
	// Whatever else ended the reader, a writer blocked on a dead peer must
	// not wait for its write deadline: after a flush at stop the writer
	// has finished already.
	raw.Close()
	u.target.detachLink(l)
	<-p.done
	return err
}

// awaitClosed waits until p's writer has sent its close frame or ended,
// at most closeGrace: the writer may be in a long write.
func awaitClosed(p *peer) {
	t := time.NewTimer(closeGrace)
	defer t.Stop()
	select {
	case <-p.closing:
	case <-p.done:
	case <-t.C:
	}
}

// readLoop is the upstream reader: it strips the ID prefix of every frame
// and hands the message to the hub. Bad frames are dropped and logged.
// Once the hub has stopped, or the writer has sent its close frame, it drops what
// it reads but reads on until the server answers the close (or the grace
// runs out): returning would close the connection under the writer's
// flush, or reset it under bytes the server has not read yet.
func (u *upstream) readLoop(r frameReader) error {
	hubGone := false
	debug := u.log.Enabled(context.Background(), slog.LevelDebug)
	for {
		data, err := r.next()
		if errors.Is(err, errTextFrame) {
			u.hub.drops.note(u.log, dropUpstreamText)
			continue
		}
		if err != nil {
			return err
		}
		f, err := u.framing.decode(data)
		if err != nil {
			u.hub.drops.note(u.log, dropUpstreamMalformed, "bytes", len(data), "err", err)
			continue
		}
		if debug {
			u.log.Debug("message from upstream", "doc", f.doc, "kind", f.kind, "bytes", len(f.data))
		}
		if hubGone || r.closed || r.p.closed() {
			continue
		}
		inbox := u.inbox
		if inbox == nil {
			inbox = u.hub.fromServer
		}
		select {
		case inbox <- f:
		case <-u.hub.quit:
			hubGone = true
		}
	}
}

// checkUpstream decodes one upstream frame into a frame for the hub: the
// document from the ID prefix, the message after it, and its awareness
// entries, if any.
func checkUpstream(m idMagic, data []byte) (frame, error) {
	doc, msg, err := splitIDFrame(m, data)
	if err != nil {
		return frame{}, err
	}
	// No local editor can have a name that the gate refuses: such a frame
	// is malformed, and its name is not fit for a log line.
	if err := checkIdentifier(doc); err != nil {
		return frame{}, err
	}
	return checkForEditors(doc, msg)
}

// errNotForEditors marks an upstream message that y-websocket editors
// cannot take or must not get: an auth message (in the ELVA protocol's
// byte layout it would read as "permission denied", PROTOCOL.md).
var errNotForEditors = errors.New("not a message for editors")

// checkForEditors checks msg, from the upstream for doc, as a message a
// y-websocket editor can take, and makes it a frame for the hub, with its
// awareness entries decoded.
func checkForEditors(doc string, msg []byte) (frame, error) {
	kind, err := messageKind(msg)
	if err != nil {
		return frame{}, err
	}
	if kind == msgAuth {
		return frame{}, fmt.Errorf("%w: auth message", errNotForEditors)
	}
	f := frame{doc: doc, data: msg, kind: kind}
	if kind == msgAwareness {
		f.aware, err = readAwareness(msg, nil)
	}
	return f, err
}

// framing is what differs between upstream protocols on one socket: how a
// frame for the hub is written and read.
type framing interface {
	// encoder returns the writer's encoding of frames, for one socket:
	// nil for a frame that is not sent (a marker).
	encoder() func(frame) []byte
	// decode reads one message from the server into a frame for the hub.
	decode(data []byte) (frame, error)
	// overhead is what the framing adds to a message of doc, in bytes.
	overhead(doc string) int
}

// idFraming is the ELVA protocol's: every message behind doc's ID prefix
// (PROTOCOL.md §2).
type idFraming struct{ magic idMagic }

// encoder prefixes each message with its document's ID, in a buffer reused
// up to 1 MiB.
func (i idFraming) encoder() func(frame) []byte {
	var buf []byte
	return func(f frame) []byte {
		if isMarker(f) {
			return nil
		}
		msg := append(appendIDPrefix(buf[:0], i.magic, f.doc), f.data...)
		if cap(msg) <= 1<<20 {
			buf = msg // reused; a large message's buffer is not kept for good
		}
		return msg
	}
}

func (i idFraming) decode(data []byte) (frame, error) { return checkUpstream(i.magic, data) }

func (i idFraming) overhead(doc string) int { return idPrefixLen(doc) }

// plainFraming is plain Yjs on a socket of one document (PROTOCOL.md §3).
type plainFraming struct{ doc string }

// encoder sends messages as they are.
func (p plainFraming) encoder() func(frame) []byte {
	return func(f frame) []byte {
		if isMarker(f) {
			return nil
		}
		return f.data
	}
}

func (p plainFraming) decode(data []byte) (frame, error) { return checkForEditors(p.doc, data) }

func (p plainFraming) overhead(string) int { return 0 }

// linkTarget takes the links of an upstream's connections: the hub (one
// connection for every document) or, in yjs mode, the dispatcher that
// feeds one document's connection.
type linkTarget interface {
	// attachLink hands over the link of a connection that is now up; false:
	// the relay is stopping.
	attachLink(l *upstreamLink) bool
	// detachLink says that the link's connection has ended.
	detachLink(l *upstreamLink)
}

// readRefusal reads the HTTP response of a refused handshake from the bytes
// the handshake already consumed and the rest of the connection.
func readRefusal(kept []byte, raw net.Conn) error {
	rest := io.LimitReader(raw, int64(maxKeptHandshake+maxErrorBody))
	r := bufio.NewReader(io.MultiReader(bytes.NewReader(kept), rest))
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		// The error quotes the line it could not parse: keep it short.
		return fmt.Errorf("websocket handshake: unreadable response: %s", shorten(err.Error(), maxErrorBody))
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	return &statusError{code: resp.StatusCode, body: strings.TrimSpace(string(body))}
}

// errHandshakeTooLarge ends a handshake whose response passes maxKeptHandshake.
var errHandshakeTooLarge = errors.New("handshake response larger than 64 KiB")

// recordingConn keeps the bytes read through it while recording is on, so
// that a refused handshake's response can be parsed again, and ends the
// handshake once they pass maxKeptHandshake.
type recordingConn struct {
	net.Conn
	recording bool // switched off by handshake before other goroutines read
	kept      []byte
}

func (r *recordingConn) Read(p []byte) (int, error) {
	if r.recording && len(r.kept) >= maxKeptHandshake {
		// http.ReadResponse has no limit of its own: a hostile server
		// could stream headers until the relay runs out of memory.
		return 0, errHandshakeTooLarge
	}
	if r.recording {
		p = p[:min(len(p), maxKeptHandshake-len(r.kept))]
	}
	n, err := r.Conn.Read(p)
	if r.recording {
		r.kept = append(r.kept, p[:n]...)
	}
	return n, err
}

// shorten cuts s to at most n bytes for a log line, marking the cut.
func shorten(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "…"
}

// hostPort gives u's host with the default port of its scheme.
func hostPort(u *url.URL) string {
	if port := u.Port(); port != "" {
		return net.JoinHostPort(u.Hostname(), port)
	}
	if u.Scheme == "wss" {
		return net.JoinHostPort(u.Hostname(), "443")
	}
	return net.JoinHostPort(u.Hostname(), "80")
}

// backoff yields reconnect delays: exponential bounds with full jitter, so
// that many relays that lost one server do not come back in lockstep.
type backoff struct {
	max     time.Duration // the cap of the bounds
	attempt int
}

// next returns a random delay in [0, min(max, base·2^attempt)).
func (b *backoff) next() time.Duration {
	bound := b.max
	if b.attempt < 16 {
		bound = min(backoffBase<<b.attempt, b.max)
	}
	b.attempt++
	return rand.N(bound)
}

// reset starts the delays from backoffBase again.
func (b *backoff) reset() { b.attempt = 0 }

// sleep waits for d or until ctx ends; it reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// defaultUpstreamGrace is how long a document's own upstream connection
// (yjs mode) stays open after its last local editor left
// (--upstream-grace): a reload costs no new handshake.
const defaultUpstreamGrace = 30 * time.Second

// maxDials bounds the handshakes in progress at once in yjs mode, so that
// a server restart with hundreds of open documents is no thundering herd.
const maxDials = 8

// yjsRemote is the yjs mode (upstreamMode): one WebSocket per document at
// SERVER/<identifier> (PROTOCOL.md §3), for the servers people run today
// (ELVA since mid-2025, @y/websocket-server, y-sweet, pycrdt-websocket).
// Its run goroutine, the dispatcher, takes the hub's one link and passes
// each frame on to its document's connection; it alone owns the map of
// documents. Each connection is an upstream of its own (dial, Basic auth,
// backoff, keepalive, close handshake) whose serve owns its socket.
type yjsRemote struct {
	base  upstream // settings every document's connection copies
	hub   *hub
	grace time.Duration
	log   *slog.Logger

	// Owned by run.
	docs    map[string]*yjsDoc
	pending []upstreamEvent // documents whose resync the hub has yet to take
	// attached holds, for each entry of pending, the reply its
	// connection waits for before it reads: the hub must take the resync
	// before it gets the server's first frames (a @y/websocket-server
	// sends its step 1 at once), so that the store answers them over the
	// new connection and not as leftovers of the old one.
	attached []chan bool
	// Static after construction.
	events chan docEvent // from the documents' connections
	idle   chan graceEnd // grace timers that ran out
	quit   chan struct{} // closed when the dispatcher stops listening
	dials  chan struct{} // a token per handshake in progress
}

// newYjsRemote makes the yjs mode from the settings of base.
func newYjsRemote(base upstream, grace time.Duration) *yjsRemote {
	return &yjsRemote{
		base:   base,
		hub:    base.hub,
		grace:  grace,
		log:    base.log,
		docs:   make(map[string]*yjsDoc),
		events: make(chan docEvent),
		idle:   make(chan graceEnd),
		quit:   make(chan struct{}),
		dials:  make(chan struct{}, maxDials),
	}
}

// yjsDoc is one document's connection as the dispatcher sees it.
type yjsDoc struct {
	link    *upstreamLink      // nil while the connection is down
	cancel  context.CancelFunc // ends the connection's run
	idleSeq int                // counts grace timers; a stale one is ignored
	idle    bool               // a grace timer runs: no local editor
	closing bool               // the grace ran out: waiting for run to end
	reopen  bool               // used again while closing: start anew after
}

// docEvent is news from one document's connection to the dispatcher: its
// link is up (attach), down, or its run has ended (with the error that
// ended it, errAuth or nil).
type docEvent struct {
	doc    string
	link   *upstreamLink
	attach bool
	ended  bool
	err    error
	reply  chan bool // for an attach: true once the hub took the resync; false when closing
}

// graceEnd is a grace timer of doc that ran out.
type graceEnd struct {
	doc string
	seq int
}

// run is the dispatcher. It returns nil when the relay stops (after every
// connection has flushed, within stopTimeout), or errAuth when a server
// refuses the credentials.
func (y *yjsRemote) run(ctx context.Context) error {
	l, ok := attachDispatcher(y.hub, nil)
	for ok {
		resyncs, next := headOf(y.pending, y.hub.upstream)
		select {
		case f, open := <-l.send:
			if !open {
				// A full queue (the hub takes a new link and resyncs) or the stop.
				if ctx.Err() != nil {
					ok = false
				} else {
					// Markers were lost meanwhile: every document goes
					// idle unless the hub's resync marks it active again.
					for doc, d := range y.docs {
						y.startGrace(doc, d)
					}
					l, ok = attachDispatcher(y.hub, nil)
				}
				continue
			}
			l.backlog.done(len(f.data))
			y.dispatch(ctx, f)
		case ev := <-y.events:
			if err := y.handle(ctx, ev); err != nil {
				y.stopAll()
				return err
			}
		case t := <-y.idle:
			y.closeIdle(t)
		case resyncs <- next:
			y.pending = y.pending[1:]
			y.attached[0] <- true
			y.attached = y.attached[1:]
		}
	}
	y.stopAll()
	return nil
}

// attachDispatcher hands h a new link for a dispatcher, the one every
// document's frames and markers come through, with the framing's overhead
// (nil: none); false: the hub has stopped.
func attachDispatcher(h *hub, overhead func(string) int) (*upstreamLink, bool) {
	l := &upstreamLink{send: make(chan frame, upstreamQueue), overhead: overhead, markers: true}
	return l, h.attachLink(l)
}

// dispatch passes f to its document's connection. The hub's markers
// start a document's connection (or keep it from closing) and start its
// grace when the last local editor left. While a connection is down its
// frames are dropped: the resync when it is back makes up for them, as in
// elva mode.
func (y *yjsRemote) dispatch(ctx context.Context, f frame) {
	d := y.docs[f.doc]
	switch {
	case f.kind == kindDocActive:
		y.activate(ctx, f.doc, d)
		return
	case f.kind == kindDocIdle:
		y.startGrace(f.doc, d)
		return
	case d == nil || d.closing || d.link == nil:
		return
	}
	if d.link.backlog.add(len(f.data), y.hub.linkBytes) {
		select {
		case d.link.send <- f:
			return
		default:
			d.link.backlog.done(len(f.data))
		}
	}
	y.log.Warn("upstream send queue full: reconnecting", "doc", f.doc)
	close(d.link.send) // the connection flushes, ends and reconnects
	d.link = nil
}

// activate opens doc's connection if it has none, or keeps it open.
func (y *yjsRemote) activate(ctx context.Context, doc string, d *yjsDoc) {
	switch {
	case d == nil:
		y.open(ctx, doc)
	case d.closing:
		d.reopen = true // once the closing one has ended
	default:
		d.idle = false
	}
}

// startGrace closes doc's connection after the grace unless an editor
// comes back before.
func (y *yjsRemote) startGrace(doc string, d *yjsDoc) {
	if d != nil && d.closing {
		d.reopen = false // used and left again while it closes
		return
	}
	if d == nil || d.idle {
		return
	}
	d.idle, d.idleSeq = true, d.idleSeq+1
	seq := d.idleSeq
	time.AfterFunc(y.grace, func() {
		select {
		case y.idle <- graceEnd{doc, seq}:
		case <-y.quit:
		}
	})
}

// open starts the connection of doc: an upstream of its own at
// SERVER/<doc>, whose links come back here.
func (y *yjsRemote) open(ctx context.Context, doc string) *yjsDoc {
	dctx, cancel := context.WithCancel(ctx)
	d := &yjsDoc{cancel: cancel}
	y.docs[doc] = d
	u := y.base
	u.perDocument = true
	if u.user != "" {
		u.authorization = basicAuth(u.user, u.password)
	}
	u.path = docPath(y.base.url, doc)
	u.framing = plainFraming{doc}
	u.target = dispatchTarget{y.events, y.quit, doc}
	u.dialSlots = y.dials
	u.log = y.log.With("doc", doc)
	go func() {
		err := u.run(dctx)
		select {
		case y.events <- docEvent{doc: doc, ended: true, err: err}:
		case <-y.quit:
		}
	}()
	return d
}

// handle applies news from a document's connection. It returns errAuth
// when that connection's credentials were refused.
func (y *yjsRemote) handle(ctx context.Context, ev docEvent) error {
	d := y.docs[ev.doc]
	switch {
	case ev.attach:
		if d == nil || d.closing {
			ev.reply <- false
			break
		}
		d.link = ev.link
		y.pending = append(y.pending, upstreamEvent{resync: ev.doc})
		y.attached = append(y.attached, ev.reply) // answered once the hub took the resync
	case ev.ended:
		delete(y.docs, ev.doc)
		if ev.err != nil {
			return ev.err
		}
		if d != nil && d.reopen {
			y.open(ctx, ev.doc) // the resync at its attach catches up
		}
	case d != nil && d.link == ev.link:
		close(ev.link.send) // its writer ends
		d.link = nil
	}
	return nil
}

// closeIdle closes the connection of a document whose grace ran out with
// no local editor back.
func (y *yjsRemote) closeIdle(t graceEnd) {
	d := y.docs[t.doc]
	if d == nil || !d.idle || d.idleSeq != t.seq || d.closing {
		return
	}
	d.closing = true
	if d.link != nil {
		close(d.link.send) // flushed, then the close handshake
		d.link = nil
	}
	d.cancel()
	y.log.Info("upstream closed", "doc", t.doc, "after", y.grace)
}

// stopAll closes every document's connection after its writer flushed
// and waits, at most stopTimeout, for them to end.
func (y *yjsRemote) stopAll() {
	for _, reply := range y.attached {
		reply <- false // the hub will not take their resyncs
	}
	y.pending, y.attached = nil, nil
	for _, d := range y.docs {
		if d.link != nil {
			close(d.link.send)
			d.link = nil
		}
		d.cancel()
	}
	deadline := time.NewTimer(stopTimeout)
	defer deadline.Stop()
	for len(y.docs) > 0 {
		select {
		case ev := <-y.events:
			if ev.ended {
				delete(y.docs, ev.doc)
			} else if ev.attach {
				ev.reply <- false
			} else if d := y.docs[ev.doc]; d != nil && d.link == ev.link {
				close(ev.link.send)
				d.link = nil
			}
		case <-deadline.C:
			close(y.quit)
			return
		}
	}
	close(y.quit)
}

// dispatchTarget takes the links of a connection for a dispatcher (yjs
// or hocuspocus mode; linkTarget): each becomes a docEvent of doc on
// events, until the dispatcher has closed quit.
type dispatchTarget struct {
	events chan<- docEvent
	quit   <-chan struct{}
	doc    string // the connection's document; "": every document
}

func (t dispatchTarget) attachLink(l *upstreamLink) bool {
	reply := make(chan bool, 1)
	select {
	case t.events <- docEvent{doc: t.doc, link: l, attach: true, reply: reply}:
		return <-reply
	case <-t.quit:
		return false
	}
}

func (t dispatchTarget) detachLink(l *upstreamLink) {
	select {
	case t.events <- docEvent{doc: t.doc, link: l}:
	case <-t.quit:
	}
}

// docPath is the request path of doc's connection under base: base's path
// and the document's name, escaped as a browser escapes a URL path (the
// WHATWG path percent-encode set: controls, space, " # < > ? ` { } and
// every non-ASCII byte), so that a server that names rooms by the raw path
// (@y/websocket-server) puts the relay where a browser's y-websocket
// client with the same room name goes. A / in the name stays a separator,
// a % stays as it is, and no query is added.
func docPath(base *url.URL, doc string) string {
	var b strings.Builder
	b.WriteString(strings.TrimSuffix(base.EscapedPath(), "/"))
	b.WriteByte('/')
	for i := 0; i < len(doc); i++ {
		c := doc[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte("\"#<>?`{}", c) >= 0 {
			fmt.Fprintf(&b, "%%%02X", c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// hpFraming is Hocuspocus's: every message behind varString(document)
// (PROTOCOL.md §4). Messages only Hocuspocus knows come out of decode as
// frames of their own type, for the dispatcher; never for editors.
type hpFraming struct{}

// encoder prefixes each message with its document's name.
func (hpFraming) encoder() func(frame) []byte {
	var buf []byte
	return func(f frame) []byte {
		if isMarker(f) {
			return nil
		}
		msg := append(appendVaruint(buf[:0], uint64(len(f.doc))), f.doc...)
		msg = append(msg, f.data...)
		if cap(msg) <= 1<<20 {
			buf = msg
		}
		return msg
	}
}

// Hocuspocus message types beyond y-websocket's (PROTOCOL.md §4).
const (
	hpSyncReply       = 4
	hpStateless       = 5
	hpBroadcastStless = 6
	hpClose           = 7
	hpSyncStatus      = 8
)

func (hpFraming) decode(data []byte) (frame, error) {
	name, n, err := readBytes(data)
	if err != nil {
		return frame{}, fmt.Errorf("document name: %w", err)
	}
	doc, msg := string(name), data[n:]
	if doc == "" {
		return frame{}, errors.New("empty document name")
	}
	if err := checkIdentifier(doc); err != nil {
		return frame{}, err
	}
	kind, n, err := readVaruint(msg)
	switch {
	case err != nil:
		return frame{}, err
	case kind == msgSync, kind == msgAwareness, kind == msgQueryAwareness:
		return checkForEditors(doc, msg)
	case kind == msgAuth, kind >= hpSyncReply && kind <= hpSyncStatus:
		// The type in one byte, however lib0 spelled it: the dispatcher
		// reads what follows from the second byte on.
		return frame{doc: doc, data: append([]byte{byte(kind)}, msg[n:]...), kind: kind}, nil
	}
	return frame{}, fmt.Errorf("%w %d", errUnknownType, kind)
}

func (hpFraming) overhead(doc string) int { return varuintLen(uint64(len(doc))) + len(doc) }

// hpAuthState is a document's authentication on the current socket.
type hpAuthState int

const (
	hpNone    hpAuthState = iota // nothing sent yet on this socket
	hpPending                    // Auth sent, its messages held
	hpOK                         // authenticated: messages go
	hpDenied                     // refused: the document stays local until a new socket
	hpClosing                    // the relay closed it: messages held until the server's answer
)

// maxHeldBytes bounds what one document holds while its Auth is pending;
// past it the held messages go and the document is resynced once it is
// authenticated.
const maxHeldBytes = 16 << 20

// hpDoc is one document on the current socket as the dispatcher sees it.
type hpDoc struct {
	state    hpAuthState
	held     []frame
	heldSize int
	overflow bool     // held messages were dropped: resync after the Auth
	sent     []uint64 // hashes of the last updates and awareness sent, for the echo
}

// maxEchoes is how many sent messages per document the echo check keeps.
const maxEchoes = 256

// hocuspocusRemote is the hocuspocus mode (upstreamMode): one socket to a
// Hocuspocus server carries every document behind its name, each
// authenticated with the token before anything else of it (PROTOCOL.md
// §4). Its run goroutine, the dispatcher, sits between the hub's link and
// the socket's: it alone owns the documents' auth states, holds their
// messages until they are authenticated, handles the messages only
// Hocuspocus knows and drops the server's echo of what the relay sent.
// The socket is an upstream whose serve owns it.
type hocuspocusRemote struct {
	base  upstream
	hub   *hub
	token string
	log   *slog.Logger

	// Static after construction.
	links chan docEvent // the socket's link, attached or detached
	retry chan string   // a closed document whose backoff has passed
	idle  chan graceEnd // grace timers of documents without local editors that ran out
	grace time.Duration // how long a document without local editors stays open
	inbox chan frame    // from the socket's reader
	ended chan error    // the socket's run returned
	quit  chan struct{} // closed when the dispatcher stops listening

	// Owned by run.
	sock   *upstreamLink
	active map[string]bool   // documents with local editors
	docs   map[string]*hpDoc // on the current socket
	named  map[string]bool   // documents whose refusal was logged; bounded
	closes closeBackoff      // documents the server closed lately
	// idleSince maps each document without local editors to its grace
	// timer's number (graceSeq), so that a stale timer is ignored.
	idleSince map[string]int
	graceSeq  int
	toHub     []frame         // from the server, on their way to the hub
	pending   []upstreamEvent // documents to resync, for the hub
	// sentSince says a message went out since the last quiet tick.
	sentSince bool
}

// newHocuspocusRemote makes the hocuspocus mode from the settings of base.
func newHocuspocusRemote(base upstream, token string, grace time.Duration) *hocuspocusRemote {
	r := &hocuspocusRemote{
		hub: base.hub, token: token, log: base.log, grace: grace,
		idle: make(chan graceEnd), idleSince: make(map[string]int),
		links: make(chan docEvent), retry: make(chan string), inbox: make(chan frame), closes: make(closeBackoff), ended: make(chan error, 1), quit: make(chan struct{}),
		active: make(map[string]bool), docs: make(map[string]*hpDoc), named: make(map[string]bool),
	}
	r.base = base
	r.base.framing = hpFraming{}
	r.base.target = dispatchTarget{r.links, r.quit, ""}
	r.base.inbox = r.inbox
	return r
}

// run is the dispatcher. It returns nil when the relay stops, after the
// socket flushed, or errAuth when the server refuses the credentials.
func (r *hocuspocusRemote) run(ctx context.Context) error {
	l, ok := attachDispatcher(r.hub, hpFraming{}.overhead)
	if !ok {
		return nil
	}
	go func() { r.ended <- r.base.run(ctx) }()
	quiet := time.NewTicker(hpQuietAfter)
	defer quiet.Stop()
	for {
		toHub, nextFrame := headOf(r.toHub, r.hub.fromServer)
		resyncs, nextDoc := headOf(r.pending, r.hub.upstream)
		select {
		case <-quiet.C:
			r.keepBusy()
		case f, open := <-l.send:
			if !open && ctx.Err() != nil {
				return r.stop()
			}
			if !open {
				clear(r.active) // the hub's resync marks them again
				if l, ok = attachDispatcher(r.hub, hpFraming{}.overhead); !ok {
					return r.stop()
				}
				continue
			}
			l.backlog.done(len(f.data))
			r.toServer(f)
		case ev := <-r.links:
			r.linkEvent(ev)
		case f := <-r.inboxIfRoom():
			r.fromServer(f)
		case toHub <- nextFrame:
			r.toHub = r.toHub[1:]
		case resyncs <- nextDoc:
			r.pending = r.pending[1:]
		case doc := <-r.retry:
			r.pending = append(r.pending, upstreamEvent{resync: doc})
		case t := <-r.idle:
			r.closeIdle(t)
		case err := <-r.ended:
			close(r.quit)
			return err
		}
	}
}

// hpQuietAfter is how long the socket may carry no message before the
// relay sends one: Hocuspocus 4 sends no pings and closes a connection
// quiet for 60 s (PROTOCOL.md §4); WebSocket pings may not count there.
const hpQuietAfter = 20 * time.Second

// keepBusy sends a query-awareness (which Hocuspocus does not answer) for
// one authenticated document if nothing went out since the last tick.
func (r *hocuspocusRemote) keepBusy() {
	if r.sentSince {
		r.sentSince = false
		return
	}
	for doc, d := range r.docs {
		if d.state == hpOK {
			r.send(frame{doc: doc, data: queryAwareness, kind: msgQueryAwareness})
			return
		}
	}
}

// inboxIfRoom is the socket reader's channel while fewer than inboxQueue
// frames wait for the hub, else nil: the reader then waits.
func (r *hocuspocusRemote) inboxIfRoom() chan frame {
	if len(r.toHub) >= inboxQueue {
		return nil
	}
	return r.inbox
}

// headOf returns ch and the first of q while q holds something, else a nil
// channel: a select case that sends only when there is something to send.
func headOf[T any](q []T, ch chan<- T) (chan<- T, T) {
	var zero T
	if len(q) == 0 {
		return nil, zero
	}
	return ch, q[0]
}

// stop closes the socket's link, so that its writer flushes, and waits
// (at most stopTimeout) for the socket's run to end.
func (r *hocuspocusRemote) stop() error {
	for _, d := range r.docs {
		if d.state == hpPending { // behind its Auth: the server replays them
			for _, f := range d.held {
				r.send(f)
			}
		}
	}
	if r.sock != nil {
		close(r.sock.send)
		r.sock = nil
	}
	close(r.quit)
	t := time.NewTimer(stopTimeout)
	defer t.Stop()
	select {
	case <-r.ended:
	case <-t.C:
	}
	return nil
}

// linkEvent takes the socket's link when it comes up (every active
// document is resynced over it, each authenticated first) and lets it go
// when it ends.
func (r *hocuspocusRemote) linkEvent(ev docEvent) {
	if ev.attach {
		r.sock = ev.link
		clear(r.docs) // a new socket: every document authenticates again
		for doc := range r.active {
			r.pending = append(r.pending, upstreamEvent{resync: doc})
		}
		ev.reply <- true
		return
	}
	if r.sock == ev.link {
		close(ev.link.send)
		r.sock = nil
		clear(r.docs)
	}
}

// toServer passes a frame from the hub on: markers keep the set of active
// documents; a document's first message on a socket is preceded by its
// Auth and held until the server answers.
func (r *hocuspocusRemote) toServer(f frame) {
	switch {
	case f.kind == kindDocActive:
		if r.sock != nil && r.docs[f.doc] == nil && !r.active[f.doc] {
			// New on this socket: the hub's resync sends its first step 1.
			r.pending = append(r.pending, upstreamEvent{resync: f.doc})
		}
		r.active[f.doc] = true
		delete(r.idleSince, f.doc)
		return
	case f.kind == kindDocIdle:
		delete(r.active, f.doc)
		r.startGrace(f.doc)
		return
	case r.sock == nil:
		return // the resync when the socket is back makes up
	}
	d := r.docs[f.doc]
	if d == nil {
		d = &hpDoc{}
		r.docs[f.doc] = d
	}
	switch d.state {
	case hpNone:
		d.state = hpPending
		r.send(frame{doc: f.doc, data: r.authMessage(), kind: msgAuth})
		r.hold(d, f)
	case hpPending, hpClosing:
		r.hold(d, f)
	case hpOK:
		r.sendRemembered(d, f)
	case hpDenied:
		r.hub.drops.allow(dropUpstreamDenied, time.Now())
	}
}

// startGrace closes doc on the socket after the grace, unless an editor
// of it comes back: the server would otherwise keep sending its news.
func (r *hocuspocusRemote) startGrace(doc string) {
	r.graceSeq++
	seq := r.graceSeq
	r.idleSince[doc] = seq
	time.AfterFunc(r.grace, func() {
		select {
		case r.idle <- graceEnd{doc, seq}:
		case <-r.quit:
		}
	})
}

// closeIdle sends the close of a document whose grace ran out with no
// local editor back (PROTOCOL.md §4: the server answers with its own
// close); until that answer comes its messages are held, since an Auth
// sent right behind a close can be lost.
func (r *hocuspocusRemote) closeIdle(t graceEnd) {
	if r.idleSince[t.doc] != t.seq || r.active[t.doc] {
		return
	}
	delete(r.idleSince, t.doc)
	d := r.docs[t.doc]
	if d == nil || d.state != hpOK {
		delete(r.docs, t.doc) // nothing open on the socket, or refused: forget it
		return
	}
	d.state, d.sent = hpClosing, nil
	reason := "provider_initiated"
	r.send(frame{doc: t.doc, data: append(appendVaruint([]byte{hpClose}, uint64(len(reason))), reason...), kind: hpClose})
	r.log.Info("upstream closed", "doc", t.doc, "after", r.grace)
}

// authMessage is the Auth message with the token: type 2, subtype 0,
// varString(token).
func (r *hocuspocusRemote) authMessage() []byte {
	msg := []byte{msgAuth, 0}
	msg = appendVaruint(msg, uint64(len(r.token)))
	return append(msg, r.token...)
}

// hold keeps f until d is authenticated, within maxHeldBytes.
func (r *hocuspocusRemote) hold(d *hpDoc, f frame) {
	if d.heldSize+len(f.data) > maxHeldBytes {
		clear(d.held)
		d.held, d.heldSize, d.overflow = nil, 0, true
		return
	}
	d.held = append(d.held, f)
	d.heldSize += len(f.data)
}

// sendRemembered sends f and remembers it, if it is an update or an
// awareness message, to know its echo.
func (r *hocuspocusRemote) sendRemembered(d *hpDoc, f frame) {
	if f.kind == msgAwareness || isUpdate(f.data) {
		if len(d.sent) >= maxEchoes {
			d.sent = d.sent[1:]
		}
		d.sent = append(d.sent, hashBytes(f.data))
	}
	r.send(f)
}

// send queues f on the socket's link without blocking; a full queue closes
// the link, and the socket reconnects and resyncs.
func (r *hocuspocusRemote) send(f frame) {
	if r.sock == nil {
		return
	}
	if r.sock.backlog.add(len(f.data), r.hub.linkBytes) {
		select {
		case r.sock.send <- f:
			r.sentSince = true
			return
		default:
			r.sock.backlog.done(len(f.data))
		}
	}
	r.log.Warn("upstream send queue full: reconnecting")
	close(r.sock.send)
	r.sock = nil
	clear(r.docs)
}

// fromServer takes a frame the server sent: Yjs messages go to the hub
// unless they are the echo of what the relay sent; Hocuspocus's own are
// handled here.
func (r *hocuspocusRemote) fromServer(f frame) {
	d := r.docs[f.doc]
	switch f.kind {
	case msgSync, msgAwareness, msgQueryAwareness:
		if d != nil && d.isEcho(f.data) {
			return
		}
		r.toHub = append(r.toHub, f)
	case msgAuth:
		r.authAnswer(f)
	case hpClose:
		r.closedByServer(f)
	default:
		r.hub.drops.allow(dropServerOnly, time.Now()) // stateless, sync status: not for editors
	}
}

// closedByServer handles the server's close of one document on the
// socket: authenticate it again and resync (PROTOCOL.md §4). After
// "Connection Timeout" Hocuspocus 3 pings that socket no more and closes
// its documents at every tick: only a new socket helps.
func (r *hocuspocusRemote) closedByServer(f frame) {
	reason := stringAfterType(f.data)
	if reason == "Connection Timeout" {
		if r.sock != nil { // the first of one per document
			r.log.Warn("upstream timed the connection out; reconnecting")
			close(r.sock.send)
			r.sock = nil
			clear(r.docs)
		}
		return
	}
	if d := r.docs[f.doc]; d != nil && d.state == hpClosing {
		// The answer to the relay's own close: authenticate again only
		// if messages came meanwhile (an editor is back).
		held := d.held
		delete(r.docs, f.doc)
		for _, h := range held {
			r.toServer(h)
		}
		return
	}
	delete(r.docs, f.doc)
	delay, first := r.closes.next(f.doc, time.Now(), r.base.retryMax)
	if first {
		r.log.Info("upstream closed the document; authenticating again", "doc", f.doc, "reason", reason)
	}
	doc := f.doc
	time.AfterFunc(delay, func() {
		select {
		case r.retry <- doc:
		case <-r.quit:
		}
	})
}

// closeBackoff spaces the new Auths of documents that the server keeps
// closing (a hook that always fails, an update it cannot apply), so that
// they cannot loop at the speed of the round trip. Owned by the dispatcher.
type closeBackoff map[string]*closeRun

// closeRun is one document's stretch of closes.
type closeRun struct {
	n    int
	last time.Time
}

// next returns how long to wait before authenticating doc again after a
// close at now, and whether this close begins a stretch (worth a log
// line). A stretch ends after stableAfter without a close.
func (b closeBackoff) next(doc string, now time.Time, cap time.Duration) (time.Duration, bool) {
	run := b[doc]
	first := run == nil || now.Sub(run.last) >= stableAfter
	if first {
		if len(b) >= maxNamedDocs {
			clear(b)
		}
		run = &closeRun{}
		b[doc] = run
	}
	run.last = now
	bo := backoff{max: cap, attempt: run.n}
	run.n++
	if first {
		return 0, true
	}
	return bo.next(), false
}

// authAnswer applies the server's answer to a document's Auth.
func (r *hocuspocusRemote) authAnswer(f frame) {
	d := r.docs[f.doc]
	sub, _, err := readVaruint(f.data[1:])
	if d == nil || err != nil {
		return
	}
	switch sub {
	case 2: // authenticated
		d.state = hpOK
		delete(r.named, f.doc)
		for _, h := range d.held {
			r.sendRemembered(d, h)
		}
		clear(d.held)
		d.held, d.heldSize = nil, 0
		if d.overflow {
			d.overflow = false
			r.pending = append(r.pending, upstreamEvent{resync: f.doc})
		}
		r.log.Info("upstream authenticated", "doc", f.doc, "scope", stringAfterType(f.data))
	case 1: // permission denied
		d.state = hpDenied
		clear(d.held)
		d.held, d.heldSize = nil, 0
		if !r.named[f.doc] {
			if len(r.named) >= maxNamedDocs {
				clear(r.named)
			}
			r.named[f.doc] = true
			r.log.Warn("upstream refused the document", "doc", f.doc, "reason", stringAfterType(f.data),
				"effect", "local editors only, until the next connection")
		}
	case 0: // send the token again
		r.send(frame{doc: f.doc, data: r.authMessage(), kind: msgAuth})
	}
}

// isEcho reports whether msg is the server's echo of a message the relay
// sent on d, and forgets it then: Hocuspocus sends every update and
// awareness message to every connection of the document, the sender's too.
func (d *hpDoc) isEcho(msg []byte) bool {
	h := hashBytes(msg)
	for i, s := range d.sent {
		if s == h {
			d.sent = append(d.sent[:i], d.sent[i+1:]...)
			return true
		}
	}
	return false
}

// hashBytes is the 64-bit FNV-1a hash of b.
func hashBytes(b []byte) uint64 {
	h := fnv.New64a()
	h.Write(b)
	return h.Sum64()
}

// isUpdate reports whether msg is a sync update (00 02).
func isUpdate(msg []byte) bool {
	return len(msg) >= 2 && msg[0] == msgSync && msg[1] == syncUpdate
}

// stringAfterType reads the varString after a message's type and subtype
// bytes, shortened for a log line; "" when there is none.
func stringAfterType(msg []byte) string {
	if len(msg) < 2 {
		return ""
	}
	rest := msg[1:]
	if msg[0] == msgAuth { // a subtype first
		_, n, err := readVaruint(rest)
		if err != nil {
			return ""
		}
		rest = rest[n:]
	}
	s, _, err := readBytes(rest)
	if err != nil {
		return ""
	}
	return shorten(strings.ToValidUTF8(string(s), "?"), maxErrorBody)
}
