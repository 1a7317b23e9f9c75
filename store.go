package main

// The local document store: every update of a document that passes the
// relay, from an editor or from the upstream, is kept on disk, so that a
// joining editor is answered at once, edits made while the server was
// unreachable reach it later (also across restarts), and the relay works
// on its own as a local Yjs server.
//
// The store is one more consumer of the hub, like the upstream writer: the
// hub hands it storeOps on a bounded queue and never waits for it; it
// answers with storeReplies that the hub delivers. Its goroutine (run)
// alone owns the documents it holds and their files.
//
// Files, in the data directory (0700): one per document, named
// docFileName(name), 0600; and owedFile, the documents whose local edits the
// server may still lack. Every file is a sequence of records:
//
//	uint32 LE length of body | uint32 LE CRC-32C of body | body
//	body: one byte record type | payload
//
// A document file starts with a recName record (the document's name, which
// the file name cannot give back) followed by recUpdate records (Yjs
// updates, format v1). Records are appended and fsynced in groups, at most
// every --fsync-interval; a torn or corrupt tail is cut at the last good
// record when the file is read. Compaction merges the updates into one and
// writes a new file that is renamed over the old one.

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	// storeQueue is how many operations the store's queue holds. When it
	// is full the hub drops the operation and notes a gap, which the
	// store repairs (opRepair).
	storeQueue = 4096
	// defaultFsyncInterval is the longest an accepted update waits in
	// memory before it is written and fsynced (--fsync-interval).
	defaultFsyncInterval = 100 * time.Millisecond
	// maxTail is how many updates a document keeps unmerged at least:
	// merging is O(document), so it is done once per maxTail updates (and
	// half the document's size), not per update.
	maxTail = 256
	// compactSlack is how much a document file may exceed twice its
	// merged state before it is compacted, in bytes.
	compactSlack = 1 << 20
	// maxRecord bounds a record's body when reading, in bytes: a corrupt
	// length must not allocate gigabytes.
	maxRecord = 1 << 30
	// retryWrite is how long the store waits after a write error (disk
	// full, read-only directory) before it tries again.
	retryWrite = 2 * time.Second
	// pingPatience is how long the store waits for the server's answer
	// to its ping before it lets go of a document no editor holds open.
	pingPatience = 30 * time.Second
	// confirmQuiet is how long after its last local edit a document with
	// editors is pinged, so that the server confirms edits while editors
	// stay (the status page's "owed"): after a pause in the typing, not
	// per keystroke. confirmEvery spaces those pings further: each costs
	// the store a merge of the document for its state vector (O(document))
	// and two rewrites of the owed list.
	confirmQuiet = 2 * time.Second
	confirmEvery = 30 * time.Second
	// runningFile exists while a relay runs on the directory: found at
	// start, it tells that the last run did not stop cleanly.
	runningFile = "running"
	// docFileExt is the extension of a document file.
	docFileExt = ".ydoc"
	// owedFile lists the documents that owe the server something.
	owedFile = "owed.list"
)

// Record types.
const (
	recName   = 1 // payload: a document name (UTF-8)
	recUpdate = 2 // payload: a Yjs update, format v1
)

// recordHeader is the bytes before a record's body: length and checksum.
const recordHeader = 8

// castagnoli is the CRC-32C table: what ext4, iSCSI and LevelDB use.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

var (
	errBadRecord = errors.New("store: bad record")
	errWrongName = errors.New("store: file belongs to another document")
)

// storeOpKind says what a storeOp asks of the store.
type storeOpKind uint8

const (
	// opUpdate: data is a Yjs sync message (step 2 or update) of doc; local
	// says it came from an editor, so the server may lack it.
	opUpdate storeOpKind = iota
	// opOpen: the editor to has joined doc: send it a step 1 with the
	// store's state vector, so that it answers with what the store lacks.
	opOpen
	// opStep1: data is a step 1 from the editor to, or from the upstream
	// (to nil): answer with a step 2 holding what its sender lacks.
	opStep1
	// opLinkUp: doc's upstream connection is (re)established: sync it.
	opLinkUp
	// opIdle: the last local editor of doc has left.
	opIdle
	// opRepair: the hub dropped operations of doc (queue full): ask the
	// editor to (or the upstream, to nil) for what the store lacks.
	opRepair
)

// storeOp is one request from the hub to the store. data is shared with
// the rest of the relay and never modified.
type storeOp struct {
	kind  storeOpKind
	doc   string
	data  []byte
	to    *conn  // an editor to answer; nil: the upstream (or nobody)
	local bool   // opUpdate from a local editor
	gen   uint64 // opLinkUp: the hub's number for this connection of doc
}

// storeReply is one answer from the store to the hub: a message for the
// editor to (if it is still there) or for the upstream (to nil), or, with
// owedNews, news that doc owes the server something (owed) or no longer.
type storeReply struct {
	doc      string
	to       *conn
	data     []byte
	owedNews bool
	owed     bool
	// stillOwed: let go although not delivered (the server did not
	// confirm); the store holds it again later.
	stillOwed bool
	gen       uint64 // to the upstream: the connection (opLinkUp gen) it was meant for
}

// storeLink is the hub's handle on the store: the queue of operations and
// its byte budget. The hub alone sends to ops and closes it at the stop.
type storeLink struct {
	ops     chan storeOp
	backlog backlog
	replies chan storeReply // from the store; read by the hub's run
	done    chan struct{}   // closed when the store has flushed and ended
}

// store is the store goroutine's state. Everything but the static fields
// is owned by run.
type store struct {
	// Static after construction.
	dir       string        // the data directory
	interval  time.Duration // --fsync-interval; 0: fsync after every operation
	pushWhole bool          // send the whole document on connect (elva mode: no step 1 from the server)
	upstream  bool          // there is a server: local edits owe it something
	link      *storeLink
	quit      <-chan struct{} // the hub's: closed when it stops reading replies
	log       *slog.Logger
	drops     *drops

	// For the status page and the metrics: written by run, read by HTTP
	// handlers.
	owedNow      atomic.Pointer[[]string] // s.owed, sorted, as of its last change
	failingSince atomic.Int64             // Unix ns when writes began to fail; 0: they do not

	// Owned by run.
	docs      map[string]*storedDoc
	owed      map[string]bool // documents whose local edits the server may lack
	owedDirty bool            // owed changed since owedFile was written
	owedRead  bool            // owedFile of an earlier run was read into owed
	dirty     bool            // something waits to be written
	failing   time.Time       // when writes started failing; zero: they do not
	retryAt   time.Time
	retry     time.Duration // the wait after a write error: retryWrite, or a test's
	wait      time.Duration // for the server's answer to a ping: pingPatience, or a test's
	patience  <-chan time.Time
	quiet     time.Duration    // confirmQuiet, or a test's
	every     time.Duration    // confirmEvery, or a test's
	confirm   <-chan time.Time // fires when a document with editors may be pinged; nil: none is due
	confirmBy time.Time        // when confirm fires
	confirmT  *time.Timer      // behind confirm; nil until first armed
	blocks    []block          // checkUpdate's scratch
}

// storedDoc is one document the store holds in memory: its merged state
// (base, plus the updates in tail not merged yet) and what is not yet on
// disk.
type storedDoc struct {
	name      string
	path      string
	base      []byte   // merged update; nil: empty document
	tail      [][]byte // later updates, not merged into base yet
	tailBytes int
	sv        []byte // encoded state vector of the whole state; nil: to compute
	pending   []byte // records not written yet
	rewrite   bool   // write the whole state anew: a write failed, or compaction
	fileSize  int64
	editors   bool // has local editors (opOpen since the last opIdle)
	// read: what the file holds is in base and tail, or not worth
	// keeping. Until then the file is read again before it is written
	// anew (reread): it could not be read when d was loaded.
	read bool

	// The sync with the server over its current connection (opLinkUp).
	// A server answers each step 1 with one step 2, in order, so when it
	// has answered the step 1 sent after the store gave it everything, it
	// has applied all of that: the store's "ping".
	sent1, got2 int    // step 1s sent upstream and step 2s heard back
	delivered   bool   // the server was sent all the store had (a diff or the whole state)
	pingAt      int    // sent1 of the outstanding ping; 0: none
	pingGen     uint64 // localGen when the ping was sent
	// waiting is when the store began to wait for the server to
	// confirm d over this connection (its link came up, or a ping went);
	// zero: not waiting.
	waiting  time.Time
	localGen uint64 // counts local updates
	gen      uint64 // the gen of the last opLinkUp
	// retryAt is when a document let go unconfirmed is held again; zero:
	// not let go. retryWait is the last wait, doubled at each let-go.
	retryAt   time.Time
	retryWait time.Duration
	// confirmAt is when to ping d, which has editors, after its last
	// local edit (confirmQuiet); zero: no ping is due. confirmedAt is when
	// the last such ping went.
	confirmAt, confirmedAt time.Time
}

// newStoreLink makes the queues between the hub and a store.
func newStoreLink() *storeLink {
	return &storeLink{
		ops:     make(chan storeOp, storeQueue),
		replies: make(chan storeReply, 256),
		done:    make(chan struct{}),
	}
}

// openStore prepares the data directory and returns the store, with the
// documents that owe the server something from an earlier run. A
// directory that cannot be created or read is logged, and the store
// keeps documents in memory and retries writing later: the relay never
// refuses to start over a fault of its store. It refuses one thing: a
// directory that another running relay holds (a *storeInUseError), as
// each would overwrite the other's edits when it compacts.
func openStore(dir string, interval time.Duration, link *storeLink, log *slog.Logger, d *drops) (*store, error) {
	s := &store{
		dir:      dir,
		interval: interval,
		link:     link,
		log:      log.With("store", dir),
		drops:    d,
		docs:     make(map[string]*storedDoc),
		owed:     make(map[string]bool),
		retry:    retryWrite,
		wait:     pingPatience,
		quiet:    confirmQuiet,
		every:    confirmEvery,
	}
	if err := prepareDir(dir); err != nil {
		s.writeFailed(err)
		return s, nil
	}
	crashed, err := claimDir(dir)
	if err != nil {
		return nil, err
	}
	s.loadOwed()
	s.checkAfterCrash(crashed)
	return s, nil
}

// storeInUseError is a store directory that a running relay holds: its
// runningFile names a live process.
type storeInUseError struct {
	dir string
	pid int
}

func (e *storeInUseError) Error() string {
	return fmt.Sprintf("store: %s is in use by another elva-service (pid %d); two relays on one store overwrite each other's edits: stop the other, or give this one its own --data-dir", e.dir, e.pid)
}

// claimDir makes dir's runningFile name this process, which marks the
// directory as held while it runs. A marker that names a live process
// other than this one is a *storeInUseError. A marker left by a process
// that is gone (or by this one: a store of an earlier test) is an earlier
// run that did not stop cleanly: crashed is when it last wrote the
// marker, zero when there was none. A marker that cannot be written is no
// error: the store works on without the guard, as it does without its
// directory.
func claimDir(dir string) (crashed time.Time, err error) {
	marker := filepath.Join(dir, runningFile)
	for range 3 { // another relay starting at once may take it in between
		pid, since, err := readMarker(marker)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return crashed, nil
		case pid > 0 && pid != os.Getpid() && processAlive(pid):
			return crashed, &storeInUseError{dir: dir, pid: pid}
		default:
			crashed = since
			os.Remove(marker)
		}
		if err := writeMarker(marker); !errors.Is(err, fs.ErrExist) {
			return crashed, nil
		}
	}
	pid, _, _ := readMarker(marker)
	return crashed, &storeInUseError{dir: dir, pid: pid}
}

// readMarker reads the process ID in a runningFile (-1: none readable, as
// in a marker of an older version) and when it was written. Errors: the
// file's.
func readMarker(path string) (pid int, since time.Time, err error) {
	st, err := os.Stat(path)
	if err != nil {
		return 0, time.Time{}, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, time.Time{}, err
	}
	pid, err = strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 0 {
		pid = -1
	}
	return pid, st.ModTime(), nil
}

// writeMarker creates the runningFile at path holding this process's ID,
// whole or not at all: it writes a temporary file and links it to path,
// which fails with fs.ErrExist when path exists (another relay was
// faster). Where hard links are not supported it creates path exclusively
// and writes it.
func writeMarker(path string) error {
	content := []byte(strconv.Itoa(os.Getpid()) + "\n")
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	if err := os.WriteFile(tmp, content, 0o600); err != nil {
		return err
	}
	defer os.Remove(tmp)
	err := os.Link(tmp, path)
	if err == nil || errors.Is(err, fs.ErrExist) {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(content)
	return errors.Join(err, f.Close())
}

// processAlive reports whether a process with ID pid runs: signal 0 is
// delivered to nobody but checks that it exists (kill(2)); EPERM means it
// exists under another user. On Windows, where signals are not sent,
// finding the process is the check.
func processAlive(pid int) bool {
	p, err := os.FindProcess(pid)
	if err != nil {
		return false
	}
	if runtime.GOOS == "windows" {
		return true
	}
	err = p.Signal(syscall.Signal(0))
	return err == nil || errors.Is(err, syscall.EPERM)
}

// runningRelay is the ID of a live relay that holds dir, or 0.
func runningRelay(dir string) int {
	pid, _, err := readMarker(filepath.Join(dir, runningFile))
	if err != nil || pid <= 0 || pid == os.Getpid() || !processAlive(pid) {
		return 0
	}
	return pid
}

// checkAfterCrash reads, at start, every document file that the last run
// wrote if that run did not stop cleanly (crashed: when its runningFile
// was written; zero: it stopped cleanly), so that a torn tail is cut and
// warned about now rather than when the document is next opened.
func (s *store) checkAfterCrash(crashed time.Time) {
	if crashed.IsZero() {
		return
	}
	checked := s.readWrittenSince(crashed.Add(-time.Second)) // coarse file times
	s.unloadIdle()                                           // checked, not needed in memory
	s.log.Info("store: the last run did not stop cleanly; the documents it wrote were checked", "docs", checked)
}

// readWrittenSince loads every document whose file was modified at or
// after since, and returns how many.
func (s *store) readWrittenSince(since time.Time) int {
	entries, _ := os.ReadDir(s.dir)
	n := 0
	for _, e := range entries {
		info, err := e.Info()
		if !strings.HasSuffix(e.Name(), docFileExt) || err != nil || info.ModTime().Before(since) {
			continue
		}
		if name, err := readName(filepath.Join(s.dir, e.Name())); err == nil && docFileName(name) == e.Name() {
			s.doc(name)
			n++
		}
	}
	return n
}

// loadOwed adds owedFile's names to s.owed and returns those it added.
func (s *store) loadOwed() []string {
	s.owedRead = true
	owed, err := readOwed(s.dir)
	if err != nil {
		s.log.Warn("store: list of documents owed to the server unreadable; they are sent when next opened", "err", err)
	}
	var added []string
	for _, name := range owed {
		if !s.owed[name] {
			s.owed[name] = true
			added = append(added, name)
		}
	}
	s.publishOwed()
	return added
}

// prepare creates the data directory again after writes failed (it may
// have been missing), and reads the owed list of an earlier run if
// openStore could not, so that writing the list keeps its names.
func (s *store) prepare() error {
	if err := prepareDir(s.dir); err != nil {
		return err
	}
	if s.owedRead {
		return nil
	}
	s.owedDirty = true // the union of the file's names and this run's
	for _, name := range s.loadOwed() {
		if s.upstream {
			s.reply(storeReply{doc: name, owedNews: true, owed: true})
		}
	}
	return nil
}

// prepareDir creates dir (0700) and removes what an interrupted
// compaction left (*.tmp). Errors: the directory's.
func prepareDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("store: create %s: %w", dir, err)
	}
	tmps, err := filepath.Glob(filepath.Join(dir, "*.tmp"))
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	for _, t := range tmps {
		os.Remove(t)
	}
	return nil
}

// owedDocs returns the documents that owe the server something, sorted.
func (s *store) owedDocs() []string {
	names := make([]string, 0, len(s.owed))
	for name := range s.owed {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// run is the store goroutine: it applies operations until the hub closes
// link.ops, then writes and fsyncs what is left and closes link.done.
// Writes and fsyncs happen at most every interval, in one group.
func (s *store) run() {
	defer close(s.link.done)
	if s.upstream && len(s.owed) > 0 {
		s.log.Info("store: documents owe the server edits; they are sent when it is reachable", "docs", len(s.owed), "names", truncatedList(s.owedDocs(), 10))
		for _, name := range s.owedDocs() {
			s.reply(storeReply{doc: name, owedNews: true, owed: true})
		}
	}
	var tick <-chan time.Time
	for {
		if s.dirty && tick == nil {
			tick = time.After(s.flushDelay())
		}
		select {
		case op, ok := <-s.link.ops:
			if !ok {
				s.stop()
				return
			}
			s.link.backlog.done(len(op.data))
			s.apply(op)
			if s.interval == 0 {
				s.flush()
			}
		case <-tick:
			tick = nil
			s.flush()
		case <-s.patience:
			s.patience = nil
			s.letGoUnconfirmed()
		case <-s.confirm:
			s.confirm = nil
			s.confirmQuietDocs()
		}
	}
}

// stop writes and fsyncs everything at the stop, compacted, and says
// what could not be written and what the server is still owed. A clean
// stop removes runningFile.
func (s *store) stop() {
	s.compactAll()
	s.retryAt = time.Time{} // the last chance: try now
	s.flush()
	if s.dirty {
		s.log.Warn("store: stopped with edits not written; they are lost unless an editor or the server has them", "docs", truncatedList(s.unwritten(), 10))
	} else {
		os.Remove(filepath.Join(s.dir, runningFile))
	}
	s.finalReport()
}

// letGoUnconfirmed lets go of the documents without editors whose ping
// the server has not answered within s.wait: a server that keeps nothing
// (a broadcast server, an ELVA room without --save) never answers, and
// the relay must not hold a connection per document open for ever. They
// stay owed, and are sent again at the next connection or start.
func (s *store) letGoUnconfirmed() {
	now := time.Now()
	var next time.Duration
	soonest := func(wait time.Duration) {
		if next == 0 || wait < next {
			next = wait
		}
	}
	for _, d := range s.docs {
		if d.editors || !s.owed[d.name] {
			continue
		}
		if !d.retryAt.IsZero() {
			if wait := d.retryAt.Sub(now); wait > 0 {
				soonest(wait)
				continue
			}
			// Held again: its next connection syncs and pings it.
			d.retryAt = time.Time{}
			s.reply(storeReply{doc: d.name, owedNews: true, owed: true})
			continue
		}
		if d.waiting.IsZero() {
			continue
		}
		if wait := d.waiting.Add(s.wait).Sub(now); wait > 0 {
			soonest(wait)
			continue
		}
		d.pingAt, d.waiting = 0, time.Time{}
		if s.pushWhole {
			continue // one connection carries every document: holding it costs nothing
		}
		d.retryWait = min(max(2*d.retryWait, 2*s.wait), maxUnconfirmedRetry)
		d.retryAt = now.Add(d.retryWait)
		soonest(d.retryWait)
		s.log.Warn("store: the server did not confirm that it keeps the document; it stays owed and is tried again later", "doc", d.name, "waited", s.wait, "retry_in", d.retryWait)
		s.reply(storeReply{doc: d.name, owedNews: true, owed: false, stillOwed: true})
	}
	if next > 0 {
		s.armPatience(next)
	}
}

// maxUnconfirmedRetry bounds the wait between two tries of a document
// that a server never confirmed.
const maxUnconfirmedRetry = time.Hour

// armPatience makes run check unanswered pings after wait, unless it
// will do so already.
func (s *store) armPatience(wait time.Duration) {
	if s.patience == nil {
		s.patience = time.After(wait)
	}
}

// flushDelay is how long run waits before the next flush: the interval,
// or longer while writes fail.
func (s *store) flushDelay() time.Duration {
	if wait := time.Until(s.retryAt); wait > 0 {
		return max(wait, s.interval)
	}
	return max(s.interval, time.Millisecond)
}

// compactAll marks for compaction every document in memory whose file
// holds more than its merged state, so that after the stop a document's
// stored size follows its content, not its history.
func (s *store) compactAll() {
	for _, d := range s.docs {
		state, err := s.state(d)
		if err == nil && d.fileSize+int64(len(d.pending)) > compactedSize(d.name, state) {
			d.rewrite, s.dirty = true, true
		}
	}
}

// compactedSize is the size of a compacted document file, in bytes: the
// name record and one update record holding state.
func compactedSize(name string, state []byte) int64 {
	return int64(2*(recordHeader+1) + len(name) + len(state))
}

// compactIfLarge merges d and marks it for rewriting if its file is more
// than twice its state (and 4 KiB).
func (s *store) compactIfLarge(d *storedDoc) {
	state, err := s.state(d)
	if err == nil && d.fileSize+int64(len(d.pending)) > 2*int64(len(state))+4096 {
		d.rewrite, s.dirty = true, true
	}
}

// unwritten returns the documents with edits not on disk, sorted.
func (s *store) unwritten() []string {
	var names []string
	for name, d := range s.docs {
		if d.rewrite || len(d.pending) > 0 {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names
}

// finalReport logs, at the stop, what still owes the server something.
func (s *store) finalReport() {
	if s.upstream && len(s.owed) > 0 {
		s.log.Info("store: documents still owe the server edits; they are sent after the next start", "docs", len(s.owed), "names", truncatedList(s.owedDocs(), 10))
	}
}

// apply carries out one operation.
func (s *store) apply(op storeOp) {
	d := s.doc(op.doc)
	switch op.kind {
	case opUpdate:
		s.update(d, op)
	case opOpen:
		d.editors, d.retryAt = true, time.Time{}
		s.reply(storeReply{doc: d.name, to: op.to, data: s.step1(d)})
	case opStep1:
		s.answer(d, op)
	case opLinkUp:
		d.gen = op.gen
		s.linkUp(d)
	case opIdle:
		s.idle(d)
	case opRepair:
		s.drops.count(dropStoreRepair)
		switch {
		case op.to != nil:
			d.editors = true // its opOpen may be what was dropped
		case d.editors:
			s.idle(d) // no editor at the hub: its opIdle may be what was dropped
		}
		s.send(d, op.to, s.step1(d))
	}
}

// send gives msg to the editor to, or the upstream when to is nil,
// counting the step 1s that go upstream.
func (s *store) send(d *storedDoc, to *conn, msg []byte) {
	if to == nil {
		if !s.upstream {
			return
		}
		if isStep1(msg) {
			d.sent1++
		}
	}
	s.reply(storeReply{doc: d.name, to: to, data: msg, gen: d.gen})
}

// reply hands r to the hub; once the hub has stopped, replies are dropped.
func (s *store) reply(r storeReply) {
	select {
	case s.link.replies <- r:
	case <-s.quit:
	}
}

// update adds the update in msg (a step 2 or update message) to d. A
// malformed message is dropped with a log line. A step 2 from the
// upstream may answer the store's ping.
func (s *store) update(d *storedDoc, op storeOp) {
	u, err := syncPayload(op.data)
	var empty bool
	if err == nil {
		empty, err = s.checkUpdate(u)
	}
	if err != nil {
		// Never stored: a bad record would come back at every start.
		s.drops.note(s.log, dropStoreMalformed, "doc", d.name, "err", err)
		return
	}
	if !empty {
		d.add(u)
		s.dirty = true
		if op.local && s.upstream {
			d.localGen++
			s.markOwed(d.name, true)
			if d.editors {
				s.confirmLater(d)
			}
		}
	}
	if len(d.tail) >= maxTail && d.tailBytes >= len(d.base) {
		// Merged now and then, so that memory follows content; only once
		// the tail is as large as the base, so that the merges, each
		// O(document), cost O(1) per byte stored (each byte is merged
		// about twice).
		s.state(d)
	}
	if !op.local && isStep2(op.data) {
		s.heardStep2(d)
	}
}

// checkUpdate decodes the update u (format v1) and reports whether it
// holds nothing: no structs and an empty delete set, as the step 2 of an
// editor that has nothing the store lacks. Errors: the decoder's.
func (s *store) checkUpdate(u []byte) (empty bool, err error) {
	var ds deleteSet
	s.blocks, ds, err = decodeUpdate(u, s.blocks[:0])
	if err != nil {
		return false, err
	}
	n := len(s.blocks)
	if cap(s.blocks) > 1<<12 {
		s.blocks = nil // one large update must not pin its blocks
	}
	if n > 0 {
		return false, nil
	}
	ds.compact()
	return len(ds) == 0, nil
}

// heardStep2 counts a step 2 from the server. Once the server has
// answered the ping and no local edit came after it, the server has
// everything of d.
func (s *store) heardStep2(d *storedDoc) {
	d.got2++
	if d.pingAt == 0 || d.got2 < d.pingAt {
		return
	}
	d.pingAt = 0
	if d.pingGen == d.localGen {
		d.waiting, d.retryWait = time.Time{}, 0
		s.markOwed(d.name, false)
		level := slog.LevelInfo
		if d.editors {
			level = slog.LevelDebug // once per pause in the typing
		}
		s.log.Log(context.Background(), level, "store: server has every edit", "doc", d.name)
		if !d.editors {
			// With editors the hub has nothing to let go, and the news
			// could reach it after their leaving (opIdle on its way),
			// where it would let go of a document owed again; idle()
			// tells it then.
			s.reply(storeReply{doc: d.name, owedNews: true, owed: false})
		}
		return
	}
	if !d.editors || d.confirmAt.IsZero() {
		// Edits came after the ping, and nothing else will ping again: no
		// editor's leaving, or a pause that came while this ping was out.
		s.ping(d)
	}
}

// confirmLater sets when to ping d, which has editors, after a local
// edit: confirmQuiet from now, and confirmEvery after the last such ping.
func (s *store) confirmLater(d *storedDoc) {
	now := time.Now()
	d.confirmAt = now.Add(s.quiet)
	if next := d.confirmedAt.Add(s.every); next.After(d.confirmAt) {
		d.confirmAt = next
	}
	s.armConfirm(d.confirmAt)
}

// armConfirm makes the confirm timer fire at at, unless it fires sooner
// already.
func (s *store) armConfirm(at time.Time) {
	if s.confirm != nil && !at.Before(s.confirmBy) {
		return
	}
	wait := time.Until(at)
	if s.confirmT == nil {
		s.confirmT = time.NewTimer(wait)
	} else {
		s.confirmT.Reset(wait) // Go 1.23+: no stale tick after a Reset
	}
	s.confirm, s.confirmBy = s.confirmT.C, at
}

// confirmQuietDocs pings the documents with editors whose last local
// edit is confirmQuiet old, and arms the timer for the next one due. A
// document whose ping is still out is pinged again when the answer
// comes (heardStep2).
func (s *store) confirmQuietDocs() {
	now := time.Now()
	var next time.Time
	for _, d := range s.docs {
		switch {
		case d.confirmAt.IsZero():
		case d.confirmAt.After(now):
			if next.IsZero() || d.confirmAt.Before(next) {
				next = d.confirmAt
			}
		default:
			d.confirmAt = time.Time{}
			if d.editors {
				d.confirmedAt = now
				s.ping(d)
			}
		}
	}
	if !next.IsZero() {
		s.armConfirm(next)
	}
}

// markOwed records whether doc owes the server something.
func (s *store) markOwed(doc string, owed bool) {
	if s.owed[doc] == owed {
		return
	}
	if owed {
		s.owed[doc] = true
	} else {
		delete(s.owed, doc)
	}
	s.owedDirty, s.dirty = true, true
	s.publishOwed()
}

// publishOwed makes the owed list as it is now the one the status page
// shows.
func (s *store) publishOwed() {
	names := s.owedDocs()
	s.owedNow.Store(&names)
}

// storeSummary is the store's part of the status page: its directory,
// the document files in it and their bytes, the documents that owe the
// server edits, and since when writes fail (zero: they do not).
type storeSummary struct {
	dir       string
	documents int
	bytes     int64
	owed      []string
	failing   time.Time
	err       error // the directory could not be read
}

// summary is the storeSummary now. Safe from any goroutine: it reads the
// directory's entries (no file's content) and what run published.
func (s *store) summary() storeSummary {
	sum := storeSummary{dir: s.dir}
	if p := s.owedNow.Load(); p != nil {
		sum.owed = *p
	}
	if ns := s.failingSince.Load(); ns != 0 {
		sum.failing = time.Unix(0, ns)
	}
	entries, err := os.ReadDir(s.dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		sum.err = err
	}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), docFileExt) {
			continue
		}
		sum.documents++
		if info, err := e.Info(); err == nil {
			sum.bytes += info.Size()
		}
	}
	return sum
}

// answer answers a step 1 with a step 2 holding what its sender lacks.
// The server's step 1 makes d delivered, and if d owes the server
// something, the store follows with its ping.
func (s *store) answer(d *storedDoc, op storeOp) {
	sv, err := syncPayload(op.data)
	if err != nil {
		s.drops.note(s.log, dropStoreMalformed, "doc", d.name, "err", err)
		return
	}
	state, err := s.state(d)
	if err == nil && !bytes.Equal(sv, emptyStateVector) {
		// Only a sender that knows something gets a diff: for one that
		// knows nothing (every new editor), the state as it is.
		state, err = diffUpdate(state, sv)
	}
	if err != nil {
		s.drops.note(s.log, dropStoreMalformed, "doc", d.name, "err", fmt.Errorf("state vector: %w", err))
		return
	}
	s.send(d, op.to, appendSyncMessage(nil, syncStep2, state))
	if op.to == nil && !d.delivered {
		// The first answer on this connection: later step 1s answer the
		// store's own (ELVA: step 2, then step 1) and must not start a
		// ping per round trip while an editor types.
		d.delivered = true
		s.ping(d)
	}
}

// ping sends the server a step 1 after it was given everything, if d owes
// it something and no ping is outstanding: its answer confirms delivery.
func (s *store) ping(d *storedDoc) {
	if !s.owed[d.name] || d.pingAt != 0 || !d.delivered {
		return
	}
	s.send(d, nil, s.step1(d))
	s.pinged(d)
}

// pinged notes that the step 1 just sent to the server for d is a ping.
func (s *store) pinged(d *storedDoc) {
	d.pingAt, d.pingGen = d.sent1, d.localGen
	s.startWaiting(d)
}

// startWaiting notes that the store waits for the server to confirm d
// from now on; without editors, it lets go of d if that takes s.wait.
func (s *store) startWaiting(d *storedDoc) {
	d.waiting = time.Now()
	if !d.editors {
		s.armPatience(s.wait)
	}
}

// linkUp syncs d over a new upstream connection: the whole state first
// where the server sends no step 1 of its own on connect (so that the
// server's answer to the step 1 that follows is already up to date), then
// a step 1, whose answer is what the store lacks.
func (s *store) linkUp(d *storedDoc) {
	d.sent1, d.got2, d.pingAt, d.delivered = 0, 0, 0, false
	if s.owed[d.name] {
		s.startWaiting(d)
	}
	if s.pushWhole && s.owed[d.name] {
		if state, err := s.state(d); err == nil {
			s.send(d, nil, appendSyncMessage(nil, syncStep2, state))
			d.delivered = true
		}
	}
	s.send(d, nil, s.step1(d))
	if d.delivered {
		s.pinged(d)
	}
}

// idle notes that d has no local editor any more. If it owes the server
// something, the hub is told to keep its upstream open until it is
// delivered, and the store pings; else d can leave memory.
func (s *store) idle(d *storedDoc) {
	d.editors = false
	if !s.upstream {
		return
	}
	if !s.owed[d.name] {
		// Nothing to hold: the hub may forget the document's connection.
		s.reply(storeReply{doc: d.name, owedNews: true, owed: false})
		return
	}
	s.reply(storeReply{doc: d.name, owedNews: true, owed: true})
	if s.ping(d); d.waiting.IsZero() {
		s.startWaiting(d) // a server that never sends a step 1 confirms nothing either
	} else {
		s.armPatience(max(time.Until(d.waiting.Add(s.wait)), 0))
	}
}

// step1 is a sync step 1 with d's state vector.
func (s *store) step1(d *storedDoc) []byte {
	if d.sv == nil {
		state, err := s.state(d)
		if err == nil {
			d.sv, err = stateVectorFromUpdate(state)
		}
		if err != nil {
			return emptyStep1 // the sender sends everything: safe
		}
	}
	return appendSyncMessage(nil, syncStep1, d.sv)
}

// state merges d's tail into its base and returns the whole state, an
// update. An update in the tail that cannot be merged is dropped with a
// log line, so one bad update never takes the others with it.
func (s *store) state(d *storedDoc) ([]byte, error) {
	if len(d.tail) == 0 {
		if d.base == nil {
			return emptyUpdate, nil
		}
		return d.base, nil
	}
	base := d.base
	if base == nil {
		base = emptyUpdate
	}
	parts := append([][]byte{base}, d.tail...)
	merged, err := mergeUpdates(parts)
	if err != nil {
		merged, err = s.mergeEach(d, parts)
	}
	if err != nil {
		return nil, err
	}
	d.base, d.tail, d.tailBytes = merged, nil, 0
	return merged, nil
}

// mergeEach merges parts one by one, leaving out each one that fails.
func (s *store) mergeEach(d *storedDoc, parts [][]byte) ([]byte, error) {
	merged := parts[0]
	for _, p := range parts[1:] {
		m, err := mergeUpdates([][]byte{merged, p})
		if err != nil {
			s.drops.note(s.log, dropStoreMalformed, "doc", d.name, "err", err)
			continue
		}
		merged = m
	}
	return merged, nil
}

// emptyUpdate is the update with no structs and no deletions;
// emptyStateVector the state vector of a document that knows nothing.
var (
	emptyUpdate      = []byte{0, 0}
	emptyStateVector = []byte{0}
)

// add appends update u to d's state and to its pending records.
func (d *storedDoc) add(u []byte) {
	d.tail = append(d.tail, u)
	d.tailBytes += len(u)
	d.sv = nil
	if d.rewrite {
		return // the whole state is written anyway
	}
	if d.fileSize == 0 && len(d.pending) == 0 {
		// A new file: its name first. Only now, so that opening a
		// document nobody edits leaves no file behind.
		d.pending = appendRecord(d.pending, recName, []byte(d.name))
	}
	d.pending = appendRecord(d.pending, recUpdate, u)
}

// adopt takes u, the one update of a compacted file, as d's merged state
// without merging it again (which would decode and re-encode all of it),
// if it decodes.
func (d *storedDoc) adopt(s *store, u []byte) bool {
	if _, err := s.checkUpdate(u); err != nil {
		return false
	}
	d.base = u
	if d.rewrite {
		s.dirty = true
	}
	return true
}

// doc returns the stored document name, reading its file on first use.
func (s *store) doc(name string) *storedDoc {
	if d := s.docs[name]; d != nil {
		return d
	}
	d := &storedDoc{name: name, path: filepath.Join(s.dir, docFileName(name))}
	s.docs[name] = d
	updates, size, err := readDocFile(d.path, name)
	// A missing file counts as read unless the directory was the trouble:
	// it may come back holding updates (see reread).
	d.read = err == nil || (errors.Is(err, fs.ErrNotExist) && s.failing.IsZero()) ||
		errors.Is(err, errWrongName) || errors.Is(err, errBadRecord)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil && !d.read && !s.failing.IsZero():
		d.rewrite = true // the store's error has said why, once
	case err != nil && !d.read:
		s.log.Warn("store: document file unreadable; its edits are kept in memory and it is read again before it is written", "doc", name, "file", d.path, "err", err)
		d.rewrite = true
	case err != nil && size == 0:
		s.log.Warn("store: document file unusable; it is written anew", "doc", name, "file", d.path, "err", err)
		d.rewrite = true
	case err != nil:
		s.log.Warn("store: document file has a torn or corrupt tail; cut at the last good record", "doc", name, "file", d.path, "kept_bytes", size, "err", err)
		d.rewrite = true
	}
	d.fileSize = size
	if len(updates) == 1 && d.adopt(s, updates[0]) {
		return d // a compacted file: its one update is the merged state
	}
	d.tail = updates
	if len(updates) > 0 {
		if _, err := s.state(d); err != nil {
			s.log.Warn("store: stored updates unreadable", "doc", name, "err", err)
		}
	}
	if d.rewrite {
		s.dirty = true
	}
	return d
}

// flush writes the owed list and every document's pending records, then
// fsyncs what it wrote: one group. A document whose write fails is kept
// in memory and written whole at a later flush.
func (s *store) flush() {
	if !s.dirty || time.Now().Before(s.retryAt) {
		return
	}
	s.dirty = false
	if !s.failing.IsZero() || !s.owedRead {
		if err := s.prepare(); err != nil {
			s.settle(err)
			return
		}
	}
	var failed error
	if s.owedDirty {
		if err := writeOwed(s.dir, s.owedDocs()); err != nil {
			failed = err
		} else {
			s.owedDirty = false
		}
	}
	type writtenDoc struct {
		d *storedDoc
		f *os.File
	}
	var written []writtenDoc
	for _, d := range s.docs {
		f, err := s.writeDoc(d)
		if err != nil {
			failed = err
			continue
		}
		if f != nil {
			written = append(written, writtenDoc{d, f})
		}
	}
	for _, w := range written {
		if err := w.f.Sync(); err != nil {
			failed = fmt.Errorf("store: fsync %s: %w", w.f.Name(), err)
			// After a failed fsync the kernel may have dropped the
			// pages: what was appended is not known to be on disk.
			w.d.rewrite = true
		}
		w.f.Close()
	}
	s.settle(failed)
	s.unloadIdle()
}

// settle notes the outcome of a flush: a failure is logged once per
// streak and retried after retryWrite; the first success after it says
// that the store has caught up.
func (s *store) settle(failed error) {
	switch {
	case failed != nil:
		s.dirty = true
		s.retryAt = time.Now().Add(s.retry)
		s.writeFailed(failed)
	case !s.failing.IsZero():
		s.log.Info("store: writing again; caught up", "failed_for", time.Since(s.failing).Round(time.Second))
		s.failing = time.Time{}
		s.failingSince.Store(0)
	}
}

// writeFailed logs a write error, once per streak of failures.
func (s *store) writeFailed(err error) {
	s.drops.count(dropStoreWrite)
	if !s.failing.IsZero() {
		return
	}
	s.failing = time.Now()
	s.failingSince.Store(s.failing.UnixNano())
	s.log.Error("store: cannot write; documents are kept in memory and written when it works again", "err", err)
}

// writeDoc writes d's pending records (or its whole state, rewrite) and
// returns the file to fsync, nil when nothing was written.
func (s *store) writeDoc(d *storedDoc) (*os.File, error) {
	if !d.rewrite && d.fileSize > 2*int64(len(d.base)+d.tailBytes)+compactSlack {
		d.rewrite = true
	}
	if d.rewrite {
		return nil, s.compact(d)
	}
	if len(d.pending) == 0 {
		return nil, nil
	}
	f, err := os.OpenFile(d.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		d.rewrite = true
		return nil, fmt.Errorf("store: open %s: %w", d.path, err)
	}
	if _, err := f.Write(d.pending); err != nil {
		f.Close()
		d.rewrite = true // a torn record at the end: write the file anew
		return nil, fmt.Errorf("store: write %s: %w", d.path, err)
	}
	d.fileSize += int64(len(d.pending))
	d.pending = d.pending[:0]
	return f, nil
}

// compact writes d's whole state to a new file, fsyncs it and renames it
// over the old one, so that a crash leaves one or the other whole.
func (s *store) compact(d *storedDoc) error {
	if !d.read {
		if err := s.reread(d); err != nil {
			return err
		}
	}
	state, err := s.state(d)
	if err != nil {
		return err
	}
	data := appendRecord(appendRecord(nil, recName, []byte(d.name)), recUpdate, state)
	if err := writeFileAtomic(d.path, data); err != nil {
		return err
	}
	d.rewrite, d.pending, d.fileSize = false, d.pending[:0], int64(len(data))
	return nil
}

// reread adds to d what its file holds before the file is written anew:
// when d was loaded the file could not be read (its directory missing, an
// I/O error), and it may hold updates that only the disk has.
func (s *store) reread(d *storedDoc) error {
	updates, _, err := readDocFile(d.path, d.name)
	switch {
	case err == nil, errors.Is(err, fs.ErrNotExist), errors.Is(err, errWrongName), errors.Is(err, errBadRecord):
	default:
		return fmt.Errorf("store: read %s: %w", d.path, err)
	}
	if len(updates) > 0 {
		if d.base != nil {
			updates = append(updates, d.base)
		}
		d.base, d.tail, d.sv = nil, append(updates, d.tail...), nil
		d.tailBytes = 0
		for _, u := range d.tail {
			d.tailBytes += len(u)
		}
	}
	d.read = true
	return nil
}

// unloadIdle forgets the documents that have no editor, owe nothing and
// are on disk: they are read again when next used. One whose file has
// grown past twice its state is compacted first, at the next flush.
func (s *store) unloadIdle() {
	for name, d := range s.docs {
		if d.editors || s.owed[name] || len(d.pending) > 0 || d.rewrite {
			continue
		}
		if s.compactIfLarge(d); !d.rewrite {
			delete(s.docs, name)
		}
	}
}

// writeFileAtomic writes data to path through a temporary file that is
// fsynced and renamed over path; then the directory is fsynced so that the
// rename itself survives a crash.
func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("store: create %s: %w", tmp, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("store: write %s: %w", path, err)
	}
	return syncDir(filepath.Dir(path))
}

// syncDir fsyncs a directory, which makes a rename in it durable.
func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil && runtime.GOOS != "windows" {
		return fmt.Errorf("store: fsync %s: %w", dir, err)
	}
	return nil
}

// appendRecord appends one record of type typ to b: length, CRC-32C and
// body (see the file comment).
func appendRecord(b []byte, typ byte, payload []byte) []byte {
	n := 1 + len(payload)
	crc := crc32.Update(crc32.Update(0, castagnoli, []byte{typ}), castagnoli, payload)
	b = binary.LittleEndian.AppendUint32(b, uint32(n))
	b = binary.LittleEndian.AppendUint32(b, crc)
	b = append(b, typ)
	return append(b, payload...)
}

// readRecord reads the record at the start of data and returns its type,
// payload and size in bytes. Errors: errBadRecord (torn or corrupt).
func readRecord(data []byte) (typ byte, payload []byte, n int, err error) {
	if len(data) < recordHeader+1 {
		return 0, nil, 0, fmt.Errorf("%w: %d bytes left, a record needs %d", errBadRecord, len(data), recordHeader+1)
	}
	size := binary.LittleEndian.Uint32(data)
	if size == 0 || size > maxRecord || int64(size) > int64(len(data)-recordHeader) {
		return 0, nil, 0, fmt.Errorf("%w: length %d with %d bytes left", errBadRecord, size, len(data)-recordHeader)
	}
	body := data[recordHeader : recordHeader+int(size)]
	if crc32.Checksum(body, castagnoli) != binary.LittleEndian.Uint32(data[4:]) {
		return 0, nil, 0, fmt.Errorf("%w: checksum mismatch", errBadRecord)
	}
	return body[0], body[1:], recordHeader + int(size), nil
}

// readRecords splits data into records, up to the first bad one. good is
// the length of the good prefix; err says why the rest is bad (nil: all
// good).
func readRecords(data []byte, each func(typ byte, payload []byte) error) (good int, err error) {
	for good < len(data) {
		typ, payload, n, err := readRecord(data[good:])
		if err != nil {
			return good, err
		}
		if err := each(typ, payload); err != nil {
			return good, err
		}
		good += n
	}
	return good, nil
}

// readDocFile reads the document file at path, which must belong to name,
// and returns its updates and the size of its good prefix in bytes. A bad
// tail is cut (the file truncated to size) and reported in err with size
// > 0; a file of another document or without a good name record gives
// size 0. Errors: fs.ErrNotExist, errWrongName, errBadRecord, I/O.
func readDocFile(path, name string) (updates [][]byte, size int64, err error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, err
	}
	named := false
	good, bad := readRecords(data, func(typ byte, payload []byte) error {
		switch {
		case !named && (typ != recName || string(payload) != name):
			return fmt.Errorf("%w: %q", errWrongName, payload)
		case !named:
			named = true
		case typ == recUpdate:
			updates = append(updates, payload)
		}
		return nil
	})
	if !named {
		return nil, 0, cmp.Or(bad, fmt.Errorf("%w: empty file", errBadRecord))
	}
	if bad != nil {
		if terr := os.Truncate(path, int64(good)); terr != nil {
			bad = fmt.Errorf("%w (and truncating: %v)", bad, terr)
		}
	}
	return updates, int64(good), bad
}

// docFileName maps a document name to a file name inside the data
// directory: a readable slug (lower-case letters, digits, - and _; at most
// 40 bytes) for people browsing the directory, then the SHA-256 of the
// exact name in hex. The hash makes the mapping one-to-one whatever the
// name (../x, /, NUL, 250 bytes of UTF-8) and keeps names that differ only
// in case (Doc, doc) apart on case-insensitive file systems; the slug
// never holds a separator or a dot, so no name leaves the directory.
func docFileName(name string) string {
	var slug strings.Builder
	for i := 0; i < len(name) && slug.Len() < 40; i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
			slug.WriteByte(c)
		case c >= 'A' && c <= 'Z':
			slug.WriteByte(c + 'a' - 'A')
		default:
			slug.WriteByte('_')
		}
	}
	if slug.Len() == 0 {
		slug.WriteByte('_') // not a hidden file
	}
	sum := sha256.Sum256([]byte(name))
	return slug.String() + "." + hex.EncodeToString(sum[:]) + docFileExt
}

// readOwed reads owedFile in dir: the names of the documents that owe the
// server something. A missing file is an empty list.
func readOwed(dir string) ([]string, error) {
	data, err := os.ReadFile(filepath.Join(dir, owedFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	var names []string
	_, err = readRecords(data, func(typ byte, payload []byte) error {
		if typ == recName {
			names = append(names, string(payload))
		}
		return nil
	})
	return names, err
}

// writeOwed replaces owedFile in dir with names.
func writeOwed(dir string, names []string) error {
	var data []byte
	for _, name := range names {
		data = appendRecord(data, recName, []byte(name))
	}
	return writeFileAtomic(filepath.Join(dir, owedFile), data)
}

// syncPayload returns the bytes field of a sync message: the state vector
// of a step 1, the update of a step 2 or update (PROTOCOL.md §1).
// Errors: the envelope's.
func syncPayload(msg []byte) ([]byte, error) {
	kind, n, err := readVaruint(msg)
	if err != nil {
		return nil, err
	}
	if kind != msgSync {
		return nil, fmt.Errorf("%w %d: not a sync message", errUnknownType, kind)
	}
	if err := checkSync(msg[n:]); err != nil {
		return nil, err
	}
	_, m, _ := readVaruint(msg[n:]) // checked by checkSync
	payload, _, err := readBytes(msg[n+m:])
	return payload, err
}

// appendSyncMessage appends a sync message of subtype sub with payload.
func appendSyncMessage(b []byte, sub uint64, payload []byte) []byte {
	b = appendVaruint(b, msgSync)
	b = appendVaruint(b, sub)
	b = appendVaruint(b, uint64(len(payload)))
	return append(b, payload...)
}

// truncatedList joins up to n names for a log line, saying how many more.
func truncatedList(names []string, n int) string {
	if len(names) <= n {
		return strings.Join(names, ", ")
	}
	return strings.Join(names[:n], ", ") + fmt.Sprintf(" and %d more", len(names)-n)
}

// storedInfo describes one stored document for --list-docs.
type storedInfo struct {
	name  string
	bytes int64
	owed  bool
	err   error
}

// listStored reads the name record of every document file in dir.
// Errors: the directory's.
func listStored(dir string) ([]storedInfo, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil // nothing stored yet
	}
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	owed, _ := readOwed(dir)
	var list []storedInfo
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), docFileExt) {
			continue
		}
		info := storedInfo{name: e.Name()}
		path := filepath.Join(dir, e.Name())
		if name, err := readName(path); err != nil {
			info.err = err
		} else {
			info.name, info.owed = name, slices.Contains(owed, name)
		}
		if st, err := os.Stat(path); err == nil {
			info.bytes = st.Size()
		}
		list = append(list, info)
	}
	slices.SortFunc(list, func(a, b storedInfo) int { return strings.Compare(a.name, b.name) })
	return list, nil
}

// readName reads the name record at the start of a document file.
func readName(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	head := make([]byte, recordHeader+1+maxIDBytes)
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return "", err
	}
	typ, payload, _, err := readRecord(head[:n])
	if err != nil || typ != recName {
		return "", fmt.Errorf("%w: no name record", errBadRecord)
	}
	return string(payload), nil
}

// removeStored deletes the stored document name from dir, and from the
// owed list. Errors: fs.ErrNotExist when there is no such document.
func removeStored(dir, name string) error {
	if pid := runningRelay(dir); pid != 0 {
		// It holds the document in memory and would write it back.
		return fmt.Errorf("a relay (pid %d) runs on %s: stop it first, then remove %q", pid, dir, name)
	}
	err := os.Remove(filepath.Join(dir, docFileName(name)))
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("no stored document %q in %s (names are exact, case included; see --list-docs): %w", name, dir, fs.ErrNotExist)
	}
	if err != nil {
		return fmt.Errorf("store: remove %q: %w", name, err)
	}
	owed, err := readOwed(dir)
	if err != nil || !slices.Contains(owed, name) {
		return err
	}
	return writeOwed(dir, slices.DeleteFunc(owed, func(n string) bool { return n == name }))
}

// defaultDataDir is where documents are kept without --data-dir:
// $XDG_DATA_HOME/elva-service, else ~/.local/share/elva-service; on macOS
// ~/Library/Application Support/elva-service.
func defaultDataDir(getenv func(string) string) (string, error) {
	dir := userDir(getenv, "XDG_DATA_HOME", filepath.Join(".local", "share"), "elva-service")
	if dir == "" {
		return "", errors.New("no data directory: neither XDG_DATA_HOME nor HOME is set; give --data-dir")
	}
	return dir, nil
}

// userDir is the folder of app under the XDG base directory xdgVar
// (XDG_DATA_HOME, XDG_CONFIG_HOME; a relative value is ignored, as the XDG
// Base Directory Specification says), else under HOME/fallback; on macOS
// HOME/Library/Application Support/app, where platformdirs puts both.
// "": neither is set.
func userDir(getenv func(string) string, xdgVar, fallback, app string) string {
	home := getenv("HOME")
	switch x := getenv(xdgVar); {
	case runtime.GOOS == "darwin" && home != "":
		return filepath.Join(home, "Library", "Application Support", app)
	case x != "" && filepath.IsAbs(x):
		return filepath.Join(x, app)
	case home != "":
		return filepath.Join(home, fallback, app)
	}
	return ""
}
