package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// The interop tests drive real Yjs editors (interop/editors.mjs: yjs and
// y-websocket on Node, installed by `npm ci` in interop/) through the built
// relay binary. Outside CI they are skipped when Node or the packages are
// missing; in CI (CI=true) that is a failure.

// interopTimeout bounds one Node run; the script has its own, shorter one.
const interopTimeout = 90 * time.Second

// requireNode skips or fails the test when the interop clients cannot run.
func requireNode(t *testing.T) {
	t.Helper()
	_, nodeErr := exec.LookPath("node")
	_, modErr := os.Stat(filepath.Join("interop", "node_modules", "y-websocket"))
	if nodeErr == nil && modErr == nil {
		return
	}
	msg := "interop clients unavailable (install Node, then run `npm ci` in interop/)"
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// relayBinary builds the relay once per test run, with -race when the
// tests run with it, so that races in the real binary fail the run too.
func relayBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "elva-service-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "elva-service")
		args := []string{"build", "-o", binPath}
		if raceEnabled {
			args = append(args, "-race")
		}
		out, err := exec.Command("go", append(args, ".")...).CombinedOutput()
		if err != nil {
			buildErr = err
			binPath = string(out)
		}
	})
	if buildErr != nil {
		t.Fatalf("go build: %v\n%s", buildErr, binPath)
	}
	return binPath
}

// TestMain removes the built binary after the run.
func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" && buildErr == nil {
		os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// relayProcess is the built binary running on 127.0.0.1 with a free port.
type relayProcess struct {
	cmd      *exec.Cmd
	addr     string
	logs     *logBuffer
	done     chan error
	stopOnce sync.Once
}

var listeningRE = regexp.MustCompile(`msg=listening addr=(\S+)`)

// startRelayProcess runs the binary with args on a port the OS picks and
// waits until it listens and its upstream is connected.
func startRelayProcess(t *testing.T, args ...string) *relayProcess {
	t.Helper()
	p := launchRelay(t, "0", args...)
	p.waitLog(t, "upstream connected")
	return p
}

// launchRelay runs the binary with args on 127.0.0.1:port (port "0": the
// OS picks one) and waits until it listens, not for its upstream. At
// cleanup it sends SIGTERM and expects exit status 0 within testTimeout.
func launchRelay(t *testing.T, port string, args ...string) *relayProcess {
	t.Helper()
	return launchRelayEnv(t, nil, port, args...)
}

// launchRelayEnv is launchRelay with env (KEY=value) added to the test's
// environment, and ELVA_DATA_DIR set to a directory of the test's own.
func launchRelayEnv(t *testing.T, env []string, port string, args ...string) *relayProcess {
	t.Helper()
	return launchRelayCmd(t, env, exec.Command(relayBinary(t), append(args, "127.0.0.1", port)...))
}

// launchRelayFileLimit is launchRelay under a file-size limit of blocks
// (ulimit -f: 512-byte blocks in dash, 1024 in bash), as on a full disk:
// a write past it fails with EFBIG, since Go ignores SIGXFSZ.
func launchRelayFileLimit(t *testing.T, blocks int, port string, args ...string) *relayProcess {
	t.Helper()
	script := fmt.Sprintf(`ulimit -f %d && exec "$0" "$@"`, blocks)
	shArgs := append([]string{"-c", script, relayBinary(t)}, append(args, "127.0.0.1", port)...)
	return launchRelayCmd(t, nil, exec.Command("sh", shArgs...))
}

// relayEnv is the test's environment for a run of the binary: never the
// user's own data directory, but one of the test's own (unless the args
// name one: --data-dir wins over the environment); and no second of sleep
// at the exit of a -race binary (atexit_sleep_ms, 1000 by default, unless
// GORACE sets it), which every stop and every run of a tool would cost.
func relayEnv(t *testing.T) []string {
	return append(os.Environ(), "ELVA_DATA_DIR="+t.TempDir(), "GORACE=atexit_sleep_ms=0 "+os.Getenv("GORACE"))
}

// launchRelayCmd is launchRelayEnv for cmd, the binary or a shell that
// execs it (so that signals reach the relay).
func launchRelayCmd(t *testing.T, env []string, cmd *exec.Cmd) *relayProcess {
	t.Helper()
	cmd.Env = append(relayEnv(t), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &relayProcess{cmd: cmd, logs: newLogBuffer(), done: make(chan error, 1)}
	go func() {
		// One write per line: a read from the pipe can hold several, and
		// waiting for one of them must not swallow the next.
		sc := bufio.NewScanner(stderr)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			p.logs.Write(append(sc.Bytes(), '\n'))
		}
		io.Copy(p.logs, stderr) // the rest after an overlong line
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() { p.stop(t) })
	line := p.waitLog(t, "msg=listening")
	p.addr = listeningRE.FindStringSubmatch(line)[1]
	return p
}

// waitLog returns the next log line that contains substr. It fails the
// test after testTimeout, or at once when the relay exits first (for
// example because it refuses its arguments).
func (p *relayProcess) waitLog(t *testing.T, substr string) string {
	t.Helper()
	deadline := time.After(testTimeout)
	for {
		select {
		case line := <-p.logs.lines:
			if strings.Contains(line, substr) {
				return line
			}
		case err := <-p.done:
			p.done <- nil // for the cleanup: this failure is reported here
			for len(p.logs.lines) > 0 {
				if line := <-p.logs.lines; strings.Contains(line, substr) {
					return line
				}
			}
			t.Fatalf("the relay exited (%v) before logging %q:\n%s", err, substr, p.logs.String())
			return ""
		case <-deadline:
			t.Fatalf("timed out waiting for a log line with %q", substr)
			return ""
		}
	}
}

// stop ends the process with SIGTERM, or kills it after testTimeout.
func (p *relayProcess) stop(t *testing.T) {
	p.stopOnce.Do(func() { p.terminate(t) })
}

func (p *relayProcess) terminate(t *testing.T) {
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		if err != nil {
			t.Errorf("relay exited with %v after SIGTERM, want status 0", err)
		}
	case <-time.After(testTimeout):
		p.cmd.Process.Kill()
		<-p.done
		t.Errorf("relay did not stop within %v of SIGTERM", testTimeout)
	}
	p.checkLog(t)
}

// kill ends the relay with SIGKILL, as a crash or a power cut would: it
// writes nothing more. Its cleanup then has nothing to stop.
func (p *relayProcess) kill(t *testing.T) {
	p.stopOnce.Do(func() {
		p.cmd.Process.Kill()
		<-p.done
		p.checkLog(t)
	})
}

// checkLog shows the log of a failed test and fails on a data race in it.
func (p *relayProcess) checkLog(t *testing.T) {
	if t.Failed() {
		t.Logf("relay log:\n%s", p.logs.String())
	}
	if strings.Contains(p.logs.String(), "DATA RACE") {
		t.Errorf("the relay binary reported a data race:\n%s", p.logs.String())
	}
}

// lineDriver is a Node script in interop/ driven by JSON lines: one
// command per line on its stdin, one answer per line on its stdout, in
// order; the end of its input quits it (interop/commands.mjs).
type lineDriver struct {
	name    string // the script, for messages
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	answers chan string // closed when its stdout ends
	stderr  *logBuffer
}

// startLineDriver starts cmd, a script in interop/, and reads its answer
// lines into answers (room for queue of them).
func startLineDriver(t *testing.T, cmd *exec.Cmd, queue int) *lineDriver {
	t.Helper()
	cmd.Dir = "interop"
	d := &lineDriver{name: cmd.Args[1], cmd: cmd, answers: make(chan string, queue), stderr: newLogBuffer()}
	cmd.Stderr = d.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if d.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(nil, 16<<20)
		for sc.Scan() {
			d.answers <- sc.Text()
		}
		close(d.answers)
	}()
	return d
}

// exchange sends one command and returns its answer line, within
// interopTimeout; a driver that exits or stays silent fails the test.
func (d *lineDriver) exchange(t *testing.T, cmd map[string]any) string {
	t.Helper()
	line, _ := json.Marshal(cmd)
	if _, err := d.stdin.Write(append(line, '\n')); err != nil {
		t.Fatalf("%s: %v\n%s", d.name, err, d.stderr.String())
	}
	select {
	case raw, ok := <-d.answers:
		if !ok {
			t.Fatalf("%s exited\n%s", d.name, d.stderr.String())
		}
		return raw
	case <-time.After(interopTimeout):
		t.Fatalf("%s did not answer %v", d.name, cmd)
		return ""
	}
}

// editors drives interop/editors.mjs: real y-websocket editors in one
// Node process.
type editors struct {
	*lineDriver
	killed bool
}

// editorReport mirrors one editor in a report of editors.mjs.
type editorReport struct {
	Name      string   `json:"name"`
	Doc       string   `json:"doc"`
	Text      string   `json:"text"`
	Made      []string `json:"made"`
	Awareness []string `json:"awareness"`
}

// answer mirrors one answer line of editors.mjs.
type answer struct {
	OK     bool           `json:"ok"`
	Error  string         `json:"error"`
	MS     int            `json:"ms"`
	Report []editorReport `json:"report"`
}

// startEditors starts the Node process; it quits at the end of the test.
func startEditors(t *testing.T) *editors {
	t.Helper()
	requireNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), interopTimeout)
	cmd := exec.CommandContext(ctx, "node", "editors.mjs")
	e := &editors{lineDriver: startLineDriver(t, cmd, 100)}
	t.Cleanup(func() {
		e.stdin.Close() // editors.mjs quits at the end of its input
		if err := cmd.Wait(); err != nil && !e.killed {
			t.Errorf("node editors: %v\n%s", err, e.stderr.String())
		}
		cancel()
	})
	return e
}

// do sends one command and returns its answer; a failed command fails the test.
func (e *editors) do(t *testing.T, cmd map[string]any) answer {
	t.Helper()
	a := e.try(t, cmd)
	if !a.OK {
		t.Fatalf("editors %v: %s\n%s", cmd, a.Error, e.stderr.String())
	}
	return a
}

// try sends one command and returns its answer, failed or not.
func (e *editors) try(t *testing.T, cmd map[string]any) answer {
	t.Helper()
	raw := e.exchange(t, cmd)
	var a answer
	if err := json.Unmarshal([]byte(raw), &a); err != nil {
		t.Fatalf("editors answer %q: %v", raw, err)
	}
	return a
}

// join adds an editor on doc through the relay at url.
func (e *editors) join(t *testing.T, name, url, doc string) {
	t.Helper()
	e.do(t, map[string]any{"cmd": "join", "name": name, "url": url, "doc": doc})
}

// converge waits until every editor has every edit of its document and
// checks the report.
func (e *editors) converge(t *testing.T) []editorReport {
	t.Helper()
	return e.convergeWithin(t, 30*time.Second)
}

// convergeWithin is converge with another bound on the wait.
func (e *editors) convergeWithin(t *testing.T, timeout time.Duration) []editorReport {
	t.Helper()
	a := e.try(t, map[string]any{"cmd": "converge", "timeoutMs": timeout.Milliseconds()})
	if !a.OK {
		t.Errorf("editors did not converge: %s", a.Error)
	}
	checkConvergence(t, a.Report)
	return a.Report
}

// checkConvergence asserts that the editors of each document hold the same
// text, with every edit made on that document exactly once and none made
// on another.
func checkConvergence(t *testing.T, report []editorReport) {
	t.Helper()
	if len(report) == 0 {
		t.Fatal("empty report")
	}
	texts := map[string]string{} // doc → the first editor's text
	for _, got := range report {
		if first, ok := texts[got.Doc]; ok && first != got.Text {
			t.Errorf("%s on %q has %q, another editor has %q", got.Name, got.Doc, got.Text, first)
		}
		texts[got.Doc] = got.Text
		for _, other := range report {
			for _, tok := range other.Made {
				want := 0
				if other.Doc == got.Doc {
					want = 1
				}
				if n := strings.Count(got.Text, tok); n != want {
					t.Errorf("%s on %q has %s %d times, want %d", got.Name, got.Doc, tok, n, want)
				}
			}
		}
	}
}

func TestInteropThreeEditorsTwoDocuments(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	relay := startRelayProcess(t, "--server", srv.url())
	ed := startEditors(t)
	url := "ws://" + relay.addr
	docs := map[string]string{"alice": "notes", "bob": "notes", "carol": "notes", "dave": "Grüße"}
	for _, name := range []string{"alice", "bob", "carol", "dave"} {
		ed.join(t, name, url, docs[name])
	}
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 5})
	report := ed.converge(t)
	// Each editor sees the awareness of exactly its document's editors; the
	// relay's query on join makes that quick for those who came first.
	editorsOf := func(doc string) []string {
		var names []string
		for name, d := range docs {
			if d == doc {
				names = append(names, name)
			}
		}
		slices.Sort(names)
		return names
	}
	for _, r := range report {
		for _, other := range editorsOf(r.Doc) {
			ed.do(t, map[string]any{"cmd": "awareness", "name": r.Name, "of": other, "present": true})
		}
	}
	for _, r := range ed.do(t, map[string]any{"cmd": "report"}).Report {
		if want := editorsOf(r.Doc); !slices.Equal(r.Awareness, want) {
			t.Errorf("%s on %q sees awareness of %v, want %v", r.Name, r.Doc, r.Awareness, want)
		}
	}
	// Every document went upstream under its own, decoded, name.
	seen := map[string]bool{}
	for len(srv.frames) > 0 {
		doc, _, err := splitIDFrame(magicSeed, <-srv.frames)
		if err != nil {
			t.Fatalf("upstream frame without prefix: %v", err)
		}
		seen[doc] = true
	}
	if !seen["notes"] || !seen["Grüße"] || len(seen) != 2 {
		t.Errorf("upstream saw documents %v, want notes and Grüße", seen)
	}
}

// convergeWith is converge that also waits for edits made by other
// editors processes (expect: document → edits), and checks that each
// editor has those of its document once and none of another.
func (e *editors) convergeWith(t *testing.T, expect map[string][]string) []editorReport {
	t.Helper()
	a := e.try(t, map[string]any{"cmd": "converge", "timeoutMs": 30000, "expect": expect})
	if !a.OK {
		t.Errorf("editors did not converge: %s", a.Error)
	}
	checkConvergence(t, a.Report)
	checkEdits(t, a.Report, expect)
	return a.Report
}

// checkEdits fails the test unless the text of each editor in report has
// every edit in made (document → edits) of its document exactly once, and
// none made on another document.
func checkEdits(t *testing.T, report []editorReport, made map[string][]string) {
	t.Helper()
	for _, r := range report {
		for doc, edits := range made {
			want := 0
			if doc == r.Doc {
				want = 1
			}
			for _, tok := range edits {
				if n := strings.Count(r.Text, tok); n != want {
					t.Errorf("%s on %q has %s %d times, want %d", r.Name, r.Doc, tok, n, want)
				}
			}
		}
	}
}

// madeByDoc lists the edits in a report by document.
func madeByDoc(report []editorReport) map[string][]string {
	made := map[string][]string{}
	for _, r := range report {
		made[r.Doc] = append(made[r.Doc], r.Made...)
	}
	return made
}

// nodeServer is interop/elva-server.mjs, an ELVA-protocol server in broadcast
// or persistent mode, which a test can kill and start again on its port.
type nodeServer struct {
	mode  string
	store string   // persistent mode: where documents survive a restart
	extra []string // more options, such as --max-payload
	port  string
	proc  *nodeProcess // nil while killed
}

// startNodeServer starts the server on a free port, with the options in
// extra; it is killed at the end.
func startNodeServer(t *testing.T, mode string, extra ...string) *nodeServer {
	t.Helper()
	s := newNodeServer(t, mode, "0", extra...)
	s.start(t)
	return s
}

// newNodeServer is startNodeServer for a server that is not started yet:
// it will listen on port (nothing may listen there before).
func newNodeServer(t *testing.T, mode, port string, extra ...string) *nodeServer {
	t.Helper()
	requireNode(t)
	s := &nodeServer{mode: mode, store: t.TempDir(), extra: extra, port: port}
	t.Cleanup(func() { s.kill(t) })
	return s
}

// text returns the text of the Y.Text "text" of doc as the server has it
// in persistent mode.
func (s *nodeServer) text(t *testing.T, doc string) string {
	t.Helper()
	resp, err := http.Get("http://127.0.0.1:" + s.port + "/text?doc=" + url.QueryEscape(doc))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got struct {
		Text string `json:"text"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("elva-server text of %q: %s, %v", doc, resp.Status, err)
	}
	return got.Text
}

// url is the server's ws:// URI.
func (s *nodeServer) url() string { return "ws://127.0.0.1:" + s.port + "/" }

// startNode runs the Node script interop/script with args, stderr to
// stderr and every stdout line but "listening PORT" to onLine (nil:
// dropped), and waits until it listens. It returns the process, a channel
// that gets its exit once every line was read, and its port.
func startNode(t *testing.T, stderr io.Writer, onLine func(string), script string, args ...string) (*nodeProcess, string) {
	t.Helper()
	cmd := exec.Command("node", append([]string{script}, args...)...)
	cmd.Dir = "interop"
	cmd.Stderr = stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	listening := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if port, ok := strings.CutPrefix(sc.Text(), "listening "); ok {
				listening <- port
			} else if onLine != nil {
				onLine(sc.Text())
			}
		}
		done <- cmd.Wait()
	}()
	select {
	case port := <-listening:
		return &nodeProcess{cmd: cmd, done: done}, port
	case err := <-done:
		t.Fatalf("%s exited: %v\n%s", script, err, stderrText(stderr))
	case <-time.After(testTimeout):
		t.Fatalf("%s did not listen", script)
	}
	return nil, ""
}

// nodeProcess is a Node script that startNode started.
type nodeProcess struct {
	cmd  *exec.Cmd
	done chan error // its exit, once every stdout line was read
}

// kill ends p at once, as a crash would, and waits until its every line
// was read; a nil p is ended already.
func (p *nodeProcess) kill() {
	if p == nil {
		return
	}
	p.cmd.Process.Kill()
	<-p.done
}

// stderrText is what a log buffer holds, for a failure message.
func stderrText(w io.Writer) string {
	if b, ok := w.(*logBuffer); ok {
		return b.String()
	}
	return ""
}

// start runs the server on s.port and waits until it listens.
func (s *nodeServer) start(t *testing.T) {
	t.Helper()
	args := append([]string{"--port", s.port, "--mode", s.mode, "--store", s.store}, s.extra...)
	s.proc, s.port = startNode(t, os.Stderr, nil, "elva-server.mjs", args...)
}

// kill ends the server at once, as a crash would: no close frames.
func (s *nodeServer) kill(t *testing.T) {
	s.proc.kill()
	s.proc = nil
}

// testOutages kills the upstream server several times in the middle of
// continuous editing by editors on two documents behind two relays, and
// checks that every edit reaches every editor and, afterwards, a fresh
// editor that joins through a third relay.
func testOutages(t *testing.T, mode string) {
	srv := startNodeServer(t, mode)
	args := []string{"--server", srv.url(), "--retry-max", "1s"}
	r1 := startRelayProcess(t, args...)
	r2 := startRelayProcess(t, args...)
	ed := startEditors(t)
	u1, u2 := "ws://"+r1.addr, "ws://"+r2.addr
	ed.join(t, "alice", u1, "notes")
	ed.join(t, "bob", u1, "notes")
	ed.join(t, "carol", u2, "notes")
	ed.join(t, "dave", u1, "plans")
	ed.join(t, "erin", u2, "plans")
	ed.do(t, map[string]any{"cmd": "startEditing", "intervalMs": 20})
	const outages = 3
	for range outages {
		ed.do(t, map[string]any{"cmd": "waitEdits", "count": 5})
		srv.kill(t)
		r1.logs.waitFor(t, "upstream connection lost")
		r2.logs.waitFor(t, "upstream connection lost")
		ed.do(t, map[string]any{"cmd": "waitEdits", "count": 5}) // while it is down
		srv.start(t)
		r1.logs.waitFor(t, "upstream connected")
		r2.logs.waitFor(t, "upstream connected")
	}
	ed.do(t, map[string]any{"cmd": "waitEdits", "count": 5})
	ed.do(t, map[string]any{"cmd": "stopEditing"})
	report := ed.converge(t)
	made := madeByDoc(report)
	if n := len(made["notes"]); n < 3*(3*outages+1)*5 {
		t.Errorf("only %d edits on notes", n)
	}
	if mode == "persistent" {
		// Nothing but the server has the documents now.
		r1.stop(t)
		r2.stop(t)
	}
	r3 := startRelayProcess(t, args...)
	fresh := startEditors(t)
	fresh.join(t, "frank", "ws://"+r3.addr, "notes")
	fresh.join(t, "grace", "ws://"+r3.addr, "plans")
	fresh.convergeWith(t, made)
}

func TestInteropOutagesBroadcastServer(t *testing.T) { testOutages(t, "broadcast") }

func TestInteropOutagesPersistentServer(t *testing.T) { testOutages(t, "persistent") }

// kill ends the editors' process at once: their sockets close without a
// WebSocket close frame.
func (e *editors) kill(t *testing.T) {
	t.Helper()
	e.killed = true
	if err := e.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
}

func TestInteropAwarenessGoneWhenEditorKilled(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	r1 := startRelayProcess(t, "--server", srv.url())
	r2 := startRelayProcess(t, "--server", srv.url())
	ed := startEditors(t)
	ed.join(t, "alice", "ws://"+r1.addr, "notes")
	ed.join(t, "bob", "ws://"+r2.addr, "notes")
	victim := startEditors(t)
	victim.join(t, "mallory", "ws://"+r1.addr, "notes")
	for _, name := range []string{"alice", "bob"} {
		ed.do(t, map[string]any{"cmd": "awareness", "name": name, "of": "mallory", "present": true})
	}
	victim.kill(t)
	// y-websocket drops a silent peer's state after 30 s; the relay's
	// removal must beat that by far, locally and through the upstream.
	for _, name := range []string{"alice", "bob"} {
		a := ed.do(t, map[string]any{"cmd": "awareness", "name": name, "of": "mallory", "present": false, "timeoutMs": 10000})
		t.Logf("%s saw mallory gone after %d ms", name, a.MS)
	}
	ed.do(t, map[string]any{"cmd": "awareness", "name": "alice", "of": "bob", "present": true})
}

var retryDelayRE = regexp.MustCompile(`time=(\S+) level=DEBUG msg="upstream retry scheduled" delay=(\S+)`)

func TestInteropRefusedUpstreamBacksOffThenConverges(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	srv.frames = nil
	srv.refuse.Store(http.StatusServiceUnavailable)
	const retryMax = 2 * time.Second
	r1 := startRelay(t, "--server", srv.url(), "--retry-max", retryMax.String())
	r2 := startRelay(t, "--server", srv.url(), "--retry-max", retryMax.String())
	ed := startEditors(t)
	ed.join(t, "alice", "ws://"+r1.addr, "notes")
	ed.join(t, "bob", "ws://"+r1.addr, "notes")
	ed.join(t, "carol", "ws://"+r2.addr, "notes")
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 5})
	// Both relays keep trying while editors edit on each side.
	for range 8 {
		select {
		case <-srv.authHeaders:
		case <-time.After(testTimeout):
			t.Fatal("the relays stopped retrying")
		}
	}
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 5})
	srv.refuse.Store(0)
	r1.logs.waitFor(t, "upstream connected")
	r2.logs.waitFor(t, "upstream connected")
	ed.converge(t)

	for i, r := range []*testRelay{r1, r2} {
		logs := r.logs.String()
		if n := strings.Count(logs, "upstream unavailable"); n != 1 {
			t.Errorf("relay %d logged %d 'upstream unavailable' lines, want 1 for one outage", i+1, n)
		}
		if !strings.Contains(logs, `server answered HTTP 503 Service Unavailable`) {
			t.Errorf("relay %d did not log the status", i+1)
		}
		delays := retryDelayRE.FindAllStringSubmatch(logs, -1)
		if len(delays) == 0 {
			t.Errorf("relay %d logged no retry delays", i+1)
		}
		var last time.Time
		var lastDelay time.Duration
		for attempt, m := range delays {
			at, err1 := time.Parse(time.RFC3339Nano, m[1])
			d, err2 := time.ParseDuration(m[2])
			if err1 != nil || err2 != nil {
				t.Fatalf("unreadable log line %q", m[0])
			}
			if bound := min(backoffBase<<attempt, retryMax); d < 0 || d >= bound {
				t.Errorf("relay %d attempt %d waits %v, want [0, %v)", i+1, attempt, d, bound)
			}
			// The next attempt comes no sooner than the delay said.
			if attempt > 0 && at.Sub(last) < lastDelay {
				t.Errorf("relay %d attempt %d came %v after the last, which scheduled %v", i+1, attempt, at.Sub(last), lastDelay)
			}
			last, lastDelay = at, d
		}
	}
}

// freezeProxy forwards TCP connections to target. freeze makes the
// connections it has stop forwarding in both directions without closing
// them, as a path that lost its peer without a FIN does; connections made
// afterwards are forwarded as usual.
type freezeProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex // guards frozen and conns: test code, kept simple
	frozen chan struct{}
	conns  []net.Conn
}

// startFreezeProxy listens on 127.0.0.1 and forwards to target.
func startFreezeProxy(t *testing.T, target string) *freezeProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &freezeProxy{ln: ln, target: target, frozen: make(chan struct{})}
	go p.accept()
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, c := range p.conns {
			c.Close()
		}
	})
	return p
}

func (p *freezeProxy) accept() {
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			in.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, in, out)
		frozen := p.frozen
		p.mu.Unlock()
		go forwardUntil(out, in, frozen)
		go forwardUntil(in, out, frozen)
	}
}

// forwardUntil copies src to dst until frozen is closed; then it stops
// reading and writing and leaves both open.
func forwardUntil(dst, src net.Conn, frozen <-chan struct{}) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-frozen:
			return
		default:
		}
		if n > 0 {
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// freeze stops every connection the proxy has now.
func (p *freezeProxy) freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	close(p.frozen)
	p.frozen = make(chan struct{})
}

func TestInteropHalfOpenUpstreamDetected(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	srv.frames = nil
	proxy := startFreezeProxy(t, hostOf(t, srv.url()))
	const peerTimeout = time.Second
	r1 := startRelay(t, "--server", "ws://"+proxy.ln.Addr().String()+"/",
		"--ping-interval", "200ms", "--peer-timeout", peerTimeout.String(), "--retry-max", "1s")
	r2 := startRelay(t, "--server", srv.url())
	r1.logs.waitFor(t, "upstream connected")
	ed := startEditors(t)
	ed.join(t, "alice", "ws://"+r1.addr, "notes")
	ed.join(t, "bob", "ws://"+r2.addr, "notes")
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 3})
	ed.converge(t)

	proxy.freeze()
	frozeAt := time.Now()
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 5}) // lost on the frozen path
	line := r1.logs.waitFor(t, "upstream connection lost")
	t.Logf("half-open upstream detected after %v (peer timeout %v)", time.Since(frozeAt).Round(time.Millisecond), peerTimeout)
	if !strings.Contains(line, "timeout") {
		t.Errorf("connection lost for another reason than the peer timeout: %s", line)
	}
	r1.logs.waitFor(t, "upstream connected")
	ed.converge(t)
}

var acceptedRE = regexp.MustCompile(`msg="message from editor" doc=burst `)

func TestSIGTERMDuringBurstFlushesAcceptedMessages(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	relay := startRelayProcess(t, "--server", srv.url(), "-v")
	srv.waitConnected(t)
	ws := dialLocal(t, relay.addr, "burst")
	const n = 3000
	update := func(i int) []byte {
		return []byte{msgSync, syncUpdate, 4, byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)}
	}
	sent := make(chan int, 1)
	go func() {
		i := 0
		for ; i < n; i++ {
			if websocket.Message.Send(ws, update(i)) != nil {
				break
			}
		}
		sent <- i
	}()
	relay.logs.waitFor(t, `msg="message from editor" doc=burst`) // the burst is on
	relay.stop(t)                                                // SIGTERM, and exit status 0
	t.Logf("the editor sent %d of %d updates before the relay closed", <-sent, n)

	accepted := len(acceptedRE.FindAllString(relay.logs.String(), -1))
	select {
	case <-srv.disconnected: // the relay's last frame has been read
	case <-time.After(testTimeout):
		t.Fatal("the relay never closed its upstream connection")
	}
	var got []int
	for len(srv.frames) > 0 {
		doc, msg, err := splitIDFrame(magicSeed, <-srv.frames)
		if err != nil || doc != "burst" || len(msg) != 7 {
			continue
		}
		got = append(got, int(msg[3])<<24|int(msg[4])<<16|int(msg[5])<<8|int(msg[6]))
	}
	if accepted == 0 || len(got) != accepted {
		t.Errorf("the relay accepted %d updates, the server got %d", accepted, len(got))
	}
	for i, v := range got {
		if v != i {
			t.Fatalf("update %d at the server is %d: a gap or reordering", i, v)
		}
	}
}

func TestSecondSignalExitsAtOnce(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	relay := startRelayProcess(t, "--server", srv.url())
	// An editor that never answers the close frame holds the graceful stop
	// for closeGrace.
	conn, _ := rawJoin(t, relay.addr, "doc")
	conn.Write(maskedFrame(0x82, awareness))
	relay.logs.waitFor(t, "editor connected")
	relay.cmd.Process.Signal(syscall.SIGTERM)
	relay.logs.waitFor(t, "msg=stopping")
	// A second signal within signalWindow of the first is the same stop
	// delivered twice (timeout(1), systemd); a person's comes later.
	select {
	case err := <-relay.done:
		relay.done <- err // for the cleanup
		t.Fatalf("the relay exited (%v) within %v of the first signal", err, signalWindow)
	case <-time.After(signalWindow):
	}
	relay.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-relay.done:
		relay.done <- nil // for the cleanup
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 128+int(syscall.SIGTERM) {
			t.Errorf("exit %v, want status %d at once after the second SIGTERM", err, 128+int(syscall.SIGTERM))
		}
	case <-time.After(testTimeout):
		t.Fatal("the relay ignored the second signal")
	}
}

// hostileMessages returns n byte strings of the kinds an attacker or a
// broken peer sends: empty, truncated and overlong varuints, lengths beyond
// the frame or near 2^64, unknown types, random bytes.
func hostileMessages(n int, seed uint64) [][]byte {
	rng := rand.New(rand.NewPCG(seed, seed))
	shapes := []func() []byte{
		func() []byte { return nil },
		func() []byte { return []byte{0x80} },
		func() []byte {
			return []byte{msgSync, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}
		},
		func() []byte {
			return []byte{msgSync, syncUpdate, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}
		},
		func() []byte { return []byte{msgSync, syncUpdate, 50, 1, 2} },
		func() []byte { return []byte{msgAwareness, 20, 1} },
		func() []byte { return []byte{msgAwareness, 4, 0xff, 0xff, 0xff, 0x0f} },
		func() []byte { return []byte{byte(4 + rng.IntN(250)), 0} },
		func() []byte { return []byte{msgSync, byte(3 + rng.IntN(100)), 0} },
		func() []byte {
			b := make([]byte, rng.IntN(64))
			for i := range b {
				b[i] = byte(rng.Uint32())
			}
			return b
		},
	}
	out := make([][]byte, n)
	for i := range out {
		out[i] = shapes[rng.IntN(len(shapes))]()
	}
	return out
}

func TestInteropHostileInputLeavesOtherDocumentsAlone(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	srv.frames = nil
	r := startRelay(t, "--server", srv.url())
	r.logs.waitFor(t, "upstream connected")
	srv.waitConnected(t)
	ed := startEditors(t)
	ed.join(t, "alice", "ws://"+r.addr, "good")
	ed.join(t, "bob", "ws://"+r.addr, "good")
	before := heapInUse()
	goroutines := runtime.NumGoroutine()

	ed.do(t, map[string]any{"cmd": "startEditing", "intervalMs": 20})
	const perSource = 2000
	var wg sync.WaitGroup
	for i := range 4 { // local attackers on another document
		conn, _ := rawJoin(t, r.addr, "bad")
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, msg := range hostileMessages(perSource, uint64(i)) {
				if _, err := conn.Write(maskedFrame(0x82, msg)); err != nil {
					t.Errorf("attacker %d: %v", i, err)
					return
				}
			}
			conn.Close()
		}()
	}
	// The upstream sends garbage too: without prefix, with a broken
	// prefix, and with a good prefix for the editors' document followed by
	// a malformed message.
	for i, msg := range hostileMessages(perSource, 99) {
		switch i % 3 {
		case 0:
			srv.sendAll(msg)
		case 1:
			srv.sendAll(append([]byte{0x02, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, msg...))
		default:
			if _, err := checkUpstream(magicSeed, append(appendIDPrefix(nil, magicSeed, "good"), msg...)); err != nil {
				srv.sendAll(append(appendIDPrefix(nil, magicSeed, "good"), msg...))
			}
		}
	}
	wg.Wait()
	ed.do(t, map[string]any{"cmd": "waitEdits", "count": 5})
	ed.do(t, map[string]any{"cmd": "stopEditing"})
	ed.converge(t)

	logs := r.logs.String()
	if n := strings.Count(logs, "malformed upstream message dropped"); n < 1 || n > 3 {
		t.Errorf("%d lines for malformed upstream messages, want a few (rate-limited)", n)
	}
	waitForGoroutines(t, goroutines)
	after := heapInUse()
	t.Logf("heap in use: %d KiB before, %d KiB after", before>>10, after>>10)
	if after > before+16<<20 {
		t.Errorf("heap grew from %d to %d bytes", before, after)
	}
}

// syncBound bounds how long editors may take to converge once nobody types.
// A sync handshake takes milliseconds; the bound only keeps a failing run
// short, because y-websocket clients never resync on their own: edits that
// missed the handshake stay missing for ever.
const syncBound = 10 * time.Second

// deadUpstream returns a ws:// URI on 127.0.0.1 where nothing listens.
func deadUpstream(t *testing.T) string {
	t.Helper()
	return "ws://127.0.0.1:" + freePort(t) + "/"
}

// freePort returns a port on 127.0.0.1 where nothing listens: one the OS
// picked, closed again.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, err := net.SplitHostPort(ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// editWhileAway has alice drop her socket; while she is away she and bob
// edit, she comes back, and everyone edits once more. Then every editor
// must converge within syncBound: a joining editor must be asked for what
// it has (a sync step 1), or its offline edits, and every later edit that
// depends on them, never reach the others.
func editWhileAway(t *testing.T, ed *editors) {
	t.Helper()
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 2})
	ed.convergeWithin(t, syncBound) // online edits work
	ed.do(t, map[string]any{"cmd": "disconnect", "name": "alice"})
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 3, "names": []string{"alice", "bob"}})
	ed.do(t, map[string]any{"cmd": "connect", "name": "alice"})
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 1})
	ed.convergeWithin(t, syncBound)
}

func TestInteropOfflineEditsUpstreamDown(t *testing.T) {
	relay := launchRelay(t, "0", "--server", deadUpstream(t))
	ed := startEditors(t)
	ed.join(t, "alice", "ws://"+relay.addr, "notes")
	ed.join(t, "bob", "ws://"+relay.addr, "notes")
	editWhileAway(t, ed)
}

func TestInteropOfflineEditsReachOtherRelays(t *testing.T) {
	srv := startNodeServer(t, "broadcast")
	r1 := startRelayProcess(t, "--server", srv.url())
	r2 := startRelayProcess(t, "--server", srv.url())
	ed := startEditors(t)
	ed.join(t, "alice", "ws://"+r1.addr, "notes")
	ed.join(t, "bob", "ws://"+r1.addr, "notes")
	ed.join(t, "carol", "ws://"+r2.addr, "notes")
	editWhileAway(t, ed)
}

func TestInteropOfflineDocumentJoins(t *testing.T) {
	srv := startNodeServer(t, "broadcast")
	r1 := startRelayProcess(t, "--server", srv.url())
	r2 := startRelayProcess(t, "--server", srv.url())
	ed := startEditors(t)
	ed.join(t, "alice", "ws://"+r1.addr, "notes")
	ed.join(t, "carol", "ws://"+r2.addr, "notes")
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 2})
	// bob, then dave, opens the document stored with edits made offline.
	// Each is checked before the next joins: a later joiner's step 1 makes
	// the earlier ones send what they have, which would hide the fault.
	for _, j := range []struct{ name, addr string }{{"bob", r1.addr}, {"dave", r2.addr}} {
		ed.do(t, map[string]any{"cmd": "join", "name": j.name, "url": "ws://" + j.addr, "doc": "notes", "offline": 3})
		ed.do(t, map[string]any{"cmd": "edit", "rounds": 1})
		ed.convergeWithin(t, syncBound)
	}
}

func TestInteropRelayRestartWhileTyping(t *testing.T) {
	upstream := deadUpstream(t)
	relay := launchRelay(t, "0", "--server", upstream)
	_, port, err := net.SplitHostPort(relay.addr)
	if err != nil {
		t.Fatal(err)
	}
	ed := startEditors(t)
	// Editors come back at different times, as browser tabs do: alice
	// retries every 50 ms, bob backs off to 2.5 s as y-websocket does by
	// default. (Two that connect within the same few milliseconds get each
	// other's step 1 and hide the fault.)
	ed.do(t, map[string]any{"cmd": "join", "name": "alice", "url": "ws://" + relay.addr, "doc": "notes", "maxBackoffMs": 50})
	ed.join(t, "bob", "ws://"+relay.addr, "notes")
	ed.do(t, map[string]any{"cmd": "startEditing", "intervalMs": 20})
	ed.do(t, map[string]any{"cmd": "waitEdits", "count": 5})
	relay.stop(t)
	ed.do(t, map[string]any{"cmd": "waitEdits", "count": 5}) // while it is down
	// The same port: the editors' providers reconnect by themselves.
	relay = launchRelay(t, port, "--server", upstream)
	relay.waitLog(t, "editor connected")
	relay.waitLog(t, "editor connected")
	ed.do(t, map[string]any{"cmd": "waitEdits", "count": 5})
	ed.do(t, map[string]any{"cmd": "stopEditing"})
	ed.convergeWithin(t, syncBound)
}

func TestInteropNewcomerSeesEditorsOnOtherRelays(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	srv.frames = nil
	r1 := startRelayProcess(t, "--server", srv.url())
	r2 := startRelayProcess(t, "--server", srv.url())
	ed := startEditors(t)
	ed.join(t, "alice", "ws://"+r1.addr, "notes")
	ed.join(t, "carol", "ws://"+r2.addr, "notes")
	// alice renews her awareness 15 s after she joined, and carol joined
	// right after her, so a bound well below 15 s is a check of behaviour,
	// not a timing assertion: carol sees alice in it only if someone
	// prompted alice to announce herself when carol came (within about a
	// second; on one relay it takes some 26 ms), never by the renewal.
	a := ed.do(t, map[string]any{"cmd": "awareness", "name": "carol", "of": "alice", "present": true, "timeoutMs": 5000})
	t.Logf("carol saw alice after %d ms", a.MS)
	ed.do(t, map[string]any{"cmd": "awareness", "name": "alice", "of": "carol", "present": true, "timeoutMs": 5000})
}

func TestInteropPercentInRoomName(t *testing.T) {
	srv := newELVAServer(t, magicSeed)
	relay := startRelayProcess(t, "--server", srv.url())
	ed := startEditors(t)
	// y-websocket puts the room name into the URL as it is: "100% sure"
	// asks for /100%%20sure and "50%off" for /50%off, which are no valid
	// escapes; "a%2Fb" asks for /a%2Fb, a real one.
	rooms := []string{"100% sure", "50%off", "a%2Fb"}
	for i, room := range rooms {
		for _, who := range []string{"first", "second"} {
			join := map[string]any{"cmd": "join", "name": fmt.Sprintf("%s%d", who, i), "url": "ws://" + relay.addr, "doc": room, "timeoutMs": 3000}
			if a := ed.try(t, join); !a.OK {
				t.Errorf("room %q: %s", room, a.Error)
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 2})
	ed.convergeWithin(t, syncBound)
	if strings.Contains(relay.logs.String(), "refused") {
		t.Errorf("the relay refused a request:\n%s", relay.logs.String())
	}
	// Three rooms, three documents upstream.
	seen := map[string]bool{}
	for len(srv.frames) > 0 {
		doc, _, err := splitIDFrame(magicSeed, <-srv.frames)
		if err != nil {
			t.Fatalf("upstream frame without prefix: %v", err)
		}
		seen[doc] = true
	}
	if len(seen) != len(rooms) {
		t.Errorf("upstream saw documents %q, want one for each of %q", slices.Sorted(maps.Keys(seen)), rooms)
	}
}

func TestInteropOversizedDocumentLeavesUpstreamAlone(t *testing.T) {
	const limit = "200000"
	srv := startNodeServer(t, "broadcast", "--max-payload", limit)
	args := []string{"--server", srv.url(), "--upstream-max-message", limit, "--retry-max", "1s"}
	r1 := startRelayProcess(t, args...)
	r2 := startRelayProcess(t, args...)
	ed := startEditors(t)
	ed.join(t, "big1", "ws://"+r1.addr, "big")
	ed.join(t, "big2", "ws://"+r1.addr, "big")
	ed.join(t, "small1", "ws://"+r1.addr, "small")
	ed.join(t, "small2", "ws://"+r2.addr, "small")
	// One update of some 300 KB: below the relay's --max-message, above
	// what the server takes.
	ed.do(t, map[string]any{"cmd": "insert", "name": "big1", "bytes": 300000})
	// Once big2 has it, the relay has queued it for the upstream too: the
	// edits below go up after it, on the same connection, and reach small2
	// without a reconnect only if the relay kept the big frame back.
	ed.convergeWithin(t, syncBound)
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 3})
	ed.convergeWithin(t, syncBound) // big among its local editors, small through the upstream

	logs := r1.logs.String()
	var told []string
	for line := range strings.Lines(logs) {
		if strings.Contains(line, "big") && strings.Contains(line, limit) {
			told = append(told, line)
		}
	}
	if len(told) != 1 {
		t.Errorf("%d log lines name the document big and the limit %s, want 1:\n%s", len(told), limit, strings.Join(told, ""))
	}
	for i, r := range []*relayProcess{r1, r2} {
		if n := strings.Count(r.logs.String(), "upstream connected"); n != 1 {
			t.Errorf("relay %d connected upstream %d times, want 1: it never sends a frame over the limit", i+1, n)
		}
	}
}

// The tests below run the relay in --protocol yjs mode (PROTOCOL.md §3):
// one upstream WebSocket per document, against the y-websocket reference
// server (interop/yjs-server.mjs, @y/websocket-server), real editors on the
// relays and straight on the server.

// yjsRoomRE matches a connection event of yjs-server.mjs.
var yjsRoomRE = regexp.MustCompile(`^(open|closed) ("(?:[^"\\]|\\.)*") (\d+) (\d+)$`)

// yjsEvent is one line of yjs-server.mjs: a WebSocket of room opened or
// closed (n of the room and total of the server open after it), or an
// upgrade refused with 403.
type yjsEvent struct {
	kind     string // "open", "closed" or "refused"
	room     string
	n, total int
	at       time.Time // when the test read it: after the event
}

// yjsServer is interop/yjs-server.mjs on 127.0.0.1, which a test can kill
// and start again on its port (with empty documents: it keeps them in
// memory). It follows the server's connection events.
type yjsServer struct {
	extra  []string // options, such as --refuse-regex
	port   string
	proc   *nodeProcess // nil while killed
	stderr *logBuffer

	mu      sync.Mutex
	open    map[string]int // room → open WebSockets now
	events  []yjsEvent     // every event since the test began
	changed chan struct{}  // closed and replaced on every event
}

// startYjsServer starts the server on a free port with the options in
// extra; it is killed at the end of the test.
func startYjsServer(t *testing.T, extra ...string) *yjsServer {
	t.Helper()
	s := newYjsServer(t, "0", extra...)
	s.start(t)
	return s
}

// newYjsServer is startYjsServer for a server that is not started yet: it
// will listen on port (nothing may listen there before).
func newYjsServer(t *testing.T, port string, extra ...string) *yjsServer {
	t.Helper()
	requireNode(t)
	s := &yjsServer{extra: extra, port: port, stderr: newLogBuffer(), open: map[string]int{}, changed: make(chan struct{})}
	t.Cleanup(func() {
		s.kill(t)
		if t.Failed() && s.stderr.String() != "" {
			t.Logf("yjs-server stderr:\n%s", s.stderr.String())
		}
	})
	return s
}

// url is the server's ws:// URI, the relay's --server.
func (s *yjsServer) url() string { return "ws://127.0.0.1:" + s.port + "/" }

// start runs the server on s.port and waits until it listens.
func (s *yjsServer) start(t *testing.T) {
	t.Helper()
	s.proc, s.port = startNode(t, s.stderr, s.note, "yjs-server.mjs", append([]string{"--port", s.port}, s.extra...)...)
}

// note records one event line of the server.
func (s *yjsServer) note(line string) {
	e := yjsEvent{at: time.Now()}
	if m := yjsRoomRE.FindStringSubmatch(line); m != nil {
		e.kind = m[1]
		json.Unmarshal([]byte(m[2]), &e.room)
		fmt.Sscan(m[3], &e.n)
		fmt.Sscan(m[4], &e.total)
	} else if room, ok := strings.CutPrefix(line, "refused "); ok {
		e.kind = "refused"
		json.Unmarshal([]byte(room), &e.room)
	} else {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if e.kind != "refused" {
		if e.n == 0 {
			delete(s.open, e.room)
		} else {
			s.open[e.room] = e.n
		}
	}
	s.events = append(s.events, e)
	close(s.changed)
	s.changed = make(chan struct{})
}

// kill ends the server at once, as a crash would: no close frames. Its
// connections are gone with it.
func (s *yjsServer) kill(t *testing.T) {
	s.proc.kill()
	s.proc = nil
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.open)
}

// waitUntil waits until cond, called with s.mu held, holds after some
// event, or fails the test after testTimeout naming what.
func (s *yjsServer) waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(testTimeout)
	for {
		s.mu.Lock()
		ok, changed, open := cond(), s.changed, maps.Clone(s.open)
		s.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("yjs-server: timed out waiting until %s; open now: %v", what, open)
		}
	}
}

// waitOpen waits until each room has exactly the given number of open
// WebSockets.
func (s *yjsServer) waitOpen(t *testing.T, want map[string]int) {
	t.Helper()
	s.waitUntil(t, fmt.Sprintf("rooms have %v WebSockets open", want), func() bool {
		for room, n := range want {
			if s.open[room] != n {
				return false
			}
		}
		return true
	})
}

// history returns a copy of the events of room (every room if "").
func (s *yjsServer) history(room string) []yjsEvent {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []yjsEvent
	for _, e := range s.events {
		if room == "" || e.room == room {
			out = append(out, e)
		}
	}
	return out
}

// count returns how many events of kind room had.
func (s *yjsServer) count(room, kind string) int {
	n := 0
	for _, e := range s.history(room) {
		if e.kind == kind {
			n++
		}
	}
	return n
}

// maxOpen returns the most WebSockets room had open at once.
func (s *yjsServer) maxOpen(room string) int {
	most := 0
	for _, e := range s.history(room) {
		most = max(most, e.n)
	}
	return most
}

// startYjsRelay runs the relay in --protocol yjs mode against srv, with
// the flags in extra. It waits only until the relay listens: in this mode
// an upstream connects when a document's first editor joins.
func startYjsRelay(t *testing.T, srv *yjsServer, extra ...string) *relayProcess {
	t.Helper()
	return launchRelay(t, "0", append([]string{"--protocol", "yjs", "--server", srv.url()}, extra...)...)
}

// logAttr renders key=value as the relay's slog text handler writes it:
// quoted when the value has spaces or other special characters.
func logAttr(key, value string) string {
	var b bytes.Buffer
	drop := func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && (a.Key == slog.TimeKey || a.Key == slog.LevelKey || a.Key == slog.MessageKey) {
			return slog.Attr{}
		}
		return a
	}
	slog.New(slog.NewTextHandler(&b, &slog.HandlerOptions{ReplaceAttr: drop})).Info("", key, value)
	return strings.TrimSpace(b.String())
}

// docLines returns the lines of logs that contain msg and the attribute
// doc=<doc> exactly (not as the prefix of a longer name).
func docLines(logs, msg, doc string) []string {
	attr := " " + logAttr("doc", doc) + " "
	var out []string
	for line := range strings.Lines(logs) {
		if strings.Contains(line, msg) && strings.Contains(" "+strings.TrimSpace(line)+" ", attr) {
			out = append(out, line)
		}
	}
	return out
}

// The relay's log messages that the yjs-mode tests rely on.
const (
	logUpstreamConnected = `msg="upstream connected"`
	logUpstreamClosed    = `msg="upstream closed"`
)

// checkUpstreams fails the test unless the relay logged want lines with
// msg for each of docs.
func checkUpstreams(t *testing.T, relay *relayProcess, msg string, want int, docs ...string) {
	t.Helper()
	logs := relay.logs.String()
	for _, doc := range docs {
		if got := docLines(logs, msg, doc); len(got) != want {
			t.Errorf("the relay logged %d lines with %s and %s, want %d:\n%s", len(got), msg, logAttr("doc", doc), want, strings.Join(got, ""))
		}
	}
}

// TestInteropYjsServerAlone checks the test server itself, without a
// relay: editors straight on it converge and see each other, its room is
// the raw path, a new WebSocket gets the server's sync step 1 and then the
// room's awareness, and --refuse-regex answers 403 with a reason.
func TestInteropYjsServerAlone(t *testing.T) {
	srv := startYjsServer(t, "--refuse-regex", `^[A-Za-z0-9_-]{1,250}$`)
	ed := startEditors(t)
	ed.join(t, "alice", srv.url(), "notes")
	ed.join(t, "bob", srv.url(), "notes")
	ed.join(t, "carol", srv.url(), "plans")
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 3})
	ed.convergeWithin(t, syncBound)
	ed.do(t, map[string]any{"cmd": "awareness", "name": "alice", "of": "bob", "present": true, "timeoutMs": 5000})
	ed.do(t, map[string]any{"cmd": "awareness", "name": "bob", "of": "alice", "present": true, "timeoutMs": 5000})
	srv.waitOpen(t, map[string]int{"notes": 2, "plans": 1})

	// What a new connection gets: step 1, then the awareness of the two.
	ws := dialLocal(t, "127.0.0.1:"+srv.port, "notes")
	if msg := receive(t, ws); !bytes.HasPrefix(msg, []byte{msgSync, syncStep1}) {
		t.Errorf("first message % x, want sync step 1", msg)
	}
	if msg := receive(t, ws); len(msg) == 0 || msg[0] != msgAwareness {
		t.Errorf("second message % x, want the room's awareness", msg)
	}
	srv.waitOpen(t, map[string]int{"notes": 3})
	ws.Close()
	srv.waitOpen(t, map[string]int{"notes": 2})

	// A name outside the regex is refused before the upgrade, with a reason.
	if status, body := upgradeStatus(t, "127.0.0.1:"+srv.port, "/bad%20name!"); status != http.StatusForbidden || !strings.Contains(body, "does not match") {
		t.Errorf("upgrade to /bad%%20name!: %d %q, want 403 with a reason", status, body)
	}
	resp, err := http.Get("http://127.0.0.1:" + srv.port + "/stats")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var stats struct {
		Rooms map[string]int `json:"rooms"`
		Total int            `json:"total"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&stats); err != nil {
		t.Fatal(err)
	}
	if stats.Total != 3 || stats.Rooms["notes"] != 2 || stats.Rooms["plans"] != 1 {
		t.Errorf("stats %+v, want notes 2, plans 1", stats)
	}
	srv.waitUntil(t, "the bad room was refused", func() bool {
		return slices.ContainsFunc(srv.events, func(e yjsEvent) bool { return e.kind == "refused" })
	})
	if n := srv.count("bad%20name!", "refused"); n != 1 || srv.count("bad%20name!", "open") != 0 {
		t.Errorf("room bad%%20name!: %d refusals and %d opens, want 1 and 0", n, srv.count("bad%20name!", "open"))
	}
}

// upgradeStatus sends a WebSocket upgrade request for target to addr and
// returns the HTTP status and body of the answer.
func upgradeStatus(t *testing.T, addr, target string) (int, string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, testTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(testTimeout))
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", target, addr)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("upgrade %s: %v", target, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// yjsRooms maps documents to their room on a y-websocket server: the name
// escaped as browsers escape a URL path (the WHATWG path percent-encode
// set; a "%" stays as it is), which is what a y-websocket client straight
// on the server asks for and what the relay must ask for too.
var yjsRooms = map[string]string{
	"notes":             "notes",
	"Grüße":             "Gr%C3%BC%C3%9Fe",
	"100% sure|[v2]{x}": "100%%20sure|[v2]%7Bx%7D", // url.PathEscape gives 100%25%20sure%7C%5Bv2%5D%7Bx%7D
}

func TestInteropYjsTwoRelaysThreeDocuments(t *testing.T) {
	srv := startYjsServer(t)
	r1 := startYjsRelay(t, srv)
	r2 := startYjsRelay(t, srv)
	ed := startEditors(t)
	docs := slices.Sorted(maps.Keys(yjsRooms))
	editorsOf := map[string][]string{} // doc → its editors, sorted
	for i, doc := range docs {
		// Two on the first relay, one on the second, one on the server.
		for _, j := range []struct{ who, url string }{
			{"ann", "ws://" + r1.addr}, {"ben", "ws://" + r1.addr}, {"cat", "ws://" + r2.addr}, {"dan", srv.url()},
		} {
			name := fmt.Sprintf("%s%d", j.who, i)
			ed.join(t, name, j.url, doc)
			editorsOf[doc] = append(editorsOf[doc], name)
		}
	}
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 5})
	report := ed.convergeWithin(t, syncBound) // one document each, isolated
	// Every editor sees every editor of its document, wherever it is,
	// sooner than the 15 s renewal: the server sends a newcomer the room's
	// states and everyone the newcomer's.
	for _, r := range report {
		for _, other := range editorsOf[r.Doc] {
			ed.do(t, map[string]any{"cmd": "awareness", "name": r.Name, "of": other, "present": true, "timeoutMs": 5000})
		}
	}
	for _, r := range ed.do(t, map[string]any{"cmd": "report"}).Report {
		if want := editorsOf[r.Doc]; !slices.Equal(r.Awareness, want) {
			t.Errorf("%s on %q sees awareness of %v, want %v", r.Name, r.Doc, r.Awareness, want)
		}
	}
	// One WebSocket per relay and document, in the room a y-websocket
	// client asks for, and no other room.
	want := map[string]int{}
	for _, room := range yjsRooms {
		want[room] = 3
	}
	srv.waitOpen(t, want)
	for _, e := range srv.history("") {
		if _, ok := want[e.room]; !ok {
			t.Errorf("the server saw %s on room %q, want only rooms %v", e.kind, e.room, slices.Sorted(maps.Keys(want)))
		}
	}
	for room := range want {
		if n := srv.count(room, "open"); n != 3 {
			t.Errorf("room %q was opened %d times, want 3: once per relay, once by the editor on the server", room, n)
		}
	}
	for _, r := range []*relayProcess{r1, r2} {
		checkUpstreams(t, r, logUpstreamConnected, 1, docs...)
	}
}

func TestInteropYjsServerRestartWhileTyping(t *testing.T) {
	srv := startYjsServer(t)
	r1 := startYjsRelay(t, srv, "--retry-max", "1s")
	r2 := startYjsRelay(t, srv, "--retry-max", "1s")
	ed := startEditors(t)
	ed.join(t, "alice", "ws://"+r1.addr, "notes")
	ed.join(t, "bob", "ws://"+r1.addr, "notes")
	ed.join(t, "carol", "ws://"+r2.addr, "notes")
	ed.join(t, "dave", "ws://"+r1.addr, "plans")
	ed.join(t, "erin", "ws://"+r2.addr, "plans")
	// frank is on the server itself and comes back on his own.
	ed.do(t, map[string]any{"cmd": "join", "name": "frank", "url": srv.url(), "doc": "notes", "maxBackoffMs": 200})
	up := map[string]int{"notes": 3, "plans": 2}
	srv.waitOpen(t, up)
	ed.do(t, map[string]any{"cmd": "startEditing", "intervalMs": 20})
	const outages = 2
	for range outages {
		ed.do(t, map[string]any{"cmd": "waitEdits", "count": 5})
		srv.kill(t) // and every document with it: it keeps them in memory
		ed.do(t, map[string]any{"cmd": "waitEdits", "count": 5})
		srv.start(t)
		srv.waitOpen(t, up) // both relays and frank are back
	}
	ed.do(t, map[string]any{"cmd": "waitEdits", "count": 5})
	ed.do(t, map[string]any{"cmd": "stopEditing"})
	ed.convergeWithin(t, syncBound)
	// plans lives only in the relays' editors: what the restarted server
	// has of it came from their resyncs. Fresh editors on the server get
	// everything from the server alone.
	ed.join(t, "fresh1", srv.url(), "notes")
	ed.join(t, "fresh2", srv.url(), "plans")
	ed.convergeWithin(t, syncBound)
	// One connect per document and relay, and one more after each restart.
	for _, r := range []*relayProcess{r1, r2} {
		checkUpstreams(t, r, logUpstreamConnected, outages+1, "notes", "plans")
	}
}

// TestInteropYjsUpstreamsFollowDocuments opens and closes documents in a
// loop: an upstream WebSocket exists for a document while it has local
// editors and for --upstream-grace after the last one left, then closes,
// so nothing accumulates; one that is joined again within the grace is
// used again.
func TestInteropYjsUpstreamsFollowDocuments(t *testing.T) {
	const (
		grace = 200 * time.Millisecond
		// closeBound bounds how long after the grace an upstream may stay.
		closeBound = 5 * time.Second
		rounds     = 20
	)
	srv := startYjsServer(t)
	relay := startYjsRelay(t, srv, "--upstream-grace", grace.String())
	ed := startEditors(t)
	var docs []string
	lastLeft := map[string]time.Time{} // room → when its relay editor was told to leave
	for i := range rounds {
		doc := fmt.Sprintf("loop-%02d", i)
		docs = append(docs, doc)
		// x is on the server, e on the relay: once x has e's edit, the
		// relay's upstream for doc is open and has carried it.
		x, e := fmt.Sprintf("x%02d", i), fmt.Sprintf("e%02d", i)
		ed.join(t, x, srv.url(), doc)
		ed.join(t, e, "ws://"+relay.addr, doc)
		ed.do(t, map[string]any{"cmd": "edit", "rounds": 1, "names": []string{e}})
		ed.convergeWithin(t, syncBound)
		srv.waitOpen(t, map[string]int{doc: 2})
		ed.do(t, map[string]any{"cmd": "leave", "name": x})
		lastLeft[doc] = time.Now()
		ed.do(t, map[string]any{"cmd": "leave", "name": e})
	}
	srv.waitUntil(t, "every loop room is closed", func() bool {
		for _, doc := range docs {
			if srv.open[doc] != 0 {
				return false
			}
		}
		return true
	})
	for _, doc := range docs {
		if n := srv.count(doc, "open"); n != 2 {
			t.Errorf("room %s was opened %d times, want 2: once by the relay, once by the editor on the server", doc, n)
		}
		if n := srv.maxOpen(doc); n != 2 {
			t.Errorf("room %s had %d WebSockets open at once, want 2", doc, n)
		}
		h := srv.history(doc)
		closed := h[len(h)-1]
		if closed.kind != "closed" || closed.n != 0 {
			t.Errorf("room %s: last event %+v, want its last close", doc, closed)
			continue
		}
		if after := closed.at.Sub(lastLeft[doc]); after < grace || after > grace+closeBound {
			t.Errorf("the upstream of %s closed %v after its last editor left, want within [%v, %v]", doc, after, grace, grace+closeBound)
		}
	}
	// The relay logged each upstream once as connected and once as closed
	// (the server has seen both already; give the log a moment to catch up).
	for n := 0; n < rounds; {
		select {
		case line := <-relay.logs.lines:
			if strings.Contains(line, logUpstreamClosed) {
				n++
			}
		case <-time.After(testTimeout):
			t.Fatalf("the relay logged %d of %d lines with %s", n, rounds, logUpstreamClosed)
		}
	}
	checkUpstreams(t, relay, logUpstreamConnected, 1, docs...)
	checkUpstreams(t, relay, logUpstreamClosed, 1, docs...)

	// Within the grace the same upstream serves a returning editor: on a
	// relay whose grace outlasts the test (its stop must not wait for it).
	// (The witness on the server shows that first's edits went upstream.)
	long := startYjsRelay(t, srv, "--upstream-grace", "1m")
	ed.join(t, "first", "ws://"+long.addr, "again")
	ed.join(t, "witness", srv.url(), "again")
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 2, "names": []string{"first"}})
	report := ed.convergeWithin(t, syncBound)
	ed.do(t, map[string]any{"cmd": "leave", "name": "witness"})
	ed.do(t, map[string]any{"cmd": "leave", "name": "first"})
	srv.waitOpen(t, map[string]int{"again": 1})
	ed.join(t, "second", "ws://"+long.addr, "again")
	ed.convergeWith(t, madeByDoc(report)) // first's edits, from the server
	if n := srv.count("again", "open"); n != 2 {
		t.Errorf("room again was opened %d times, want 2: once by the witness, once by the relay, whose upstream outlives its editors by the grace", n)
	}
	checkUpstreams(t, long, logUpstreamConnected, 1, "again")
	checkUpstreams(t, long, logUpstreamClosed, 0, "again")
}

func TestInteropYjsRefusedDocumentStaysLocal(t *testing.T) {
	srv := startYjsServer(t, "--refuse-regex", `^[A-Za-z0-9_-]{1,250}$`) // as ELVA servers
	relay := startYjsRelay(t, srv, "--retry-max", "1s")
	ed := startEditors(t)
	const bad = "bad name!"
	ed.join(t, "alice", "ws://"+relay.addr, bad)
	ed.join(t, "bob", "ws://"+relay.addr, bad)
	ed.join(t, "carol", "ws://"+relay.addr, "good")
	ed.join(t, "dave", srv.url(), "good")
	line := relay.waitLog(t, "does not match") // the 403's reason, not a hash that holds "403"
	if !strings.Contains(line, logAttr("doc", bad)) || !strings.Contains(line, "does not match") || !strings.Contains(line, "403") {
		t.Errorf("refusal logged as %q, want %s, 403 and the server's reason", line, logAttr("doc", bad))
	}
	// Some 1.5 s of typing, longer than any retry delay (--retry-max 1s):
	// the refusal is not logged again meanwhile.
	ed.do(t, map[string]any{"cmd": "startEditing", "intervalMs": 20})
	ed.do(t, map[string]any{"cmd": "waitEdits", "count": 75})
	ed.do(t, map[string]any{"cmd": "stopEditing"})
	ed.convergeWithin(t, syncBound) // bad among alice and bob, good through the server
	ed.do(t, map[string]any{"cmd": "awareness", "name": "alice", "of": "bob", "present": true, "timeoutMs": 5000})
	ed.do(t, map[string]any{"cmd": "awareness", "name": "dave", "of": "carol", "present": true, "timeoutMs": 5000})

	var refusals []string
	for l := range strings.Lines(relay.logs.String()) {
		if strings.Contains(l, "403") && strings.Contains(l, logAttr("doc", bad)) {
			refusals = append(refusals, l)
		}
	}
	if len(refusals) != 1 {
		t.Errorf("%d log lines name the refusal of %q, want 1:\n%s", len(refusals), bad, strings.Join(refusals, ""))
	}
	const badRoom = "bad%20name!"
	if srv.count(badRoom, "refused") == 0 || srv.count(badRoom, "open") != 0 {
		t.Errorf("room %s: %d refusals and %d opens, want some and 0", badRoom, srv.count(badRoom, "refused"), srv.count(badRoom, "open"))
	}
	for _, e := range srv.history("") {
		if e.room != badRoom && e.room != "good" {
			t.Errorf("the server saw %s on room %q", e.kind, e.room)
		}
	}
	if n := srv.count("good", "open"); n != 2 {
		t.Errorf("room good was opened %d times, want 2: once by the relay, once by dave", n)
	}
	checkUpstreams(t, relay, logUpstreamConnected, 1, "good")
	checkUpstreams(t, relay, logUpstreamConnected, 0, bad)
}

// The tests below run the relay in --protocol hocuspocus mode (PROTOCOL.md
// §4): one upstream WebSocket for every document, each frame prefixed with
// the document's name, each document authenticated with --token first;
// against a real Hocuspocus server (interop/hocuspocus-server.mjs,
// @hocuspocus/server 3.4.4), with y-websocket editors on the relays and
// HocuspocusProvider editors straight on the server.

// hpToken is the token the test servers take; hpRefusal is the reason they
// give any other token (hocuspocus-server.mjs's refusal).
const (
	hpToken   = "secret"
	hpRefusal = "token refused by hocuspocus-server"
)

// The relay's log messages that the hocuspocus-mode tests rely on.
const (
	logUpstreamAuthenticated = `msg="upstream authenticated"`
	logUpstreamRefusedDoc    = `msg="upstream refused the document"`
)

// hpEvent is one line of hocuspocus-server.mjs.
type hpEvent struct {
	kind string // connect, disconnect, auth-ok, auth-denied, doc-closed, loaded, unloaded
	n    int    // the server's number of the WebSocket (0 for loaded, unloaded)
	doc  string // the document ("" for connect, disconnect)
	run  int    // which start of the server printed it, from 1
}

// hpServer is interop/hocuspocus-server.mjs on 127.0.0.1, which a test can
// kill and start again on its port (with empty documents: it keeps them in
// memory, or in the other instances behind its Redis). It follows the
// server's events.
type hpServer struct {
	extra  []string // options, such as --token or --timeout
	port   string
	proc   *nodeProcess // nil while killed
	stderr *logBuffer

	mu      sync.Mutex
	run     int           // starts so far
	events  []hpEvent     // every event since the test began
	changed chan struct{} // closed and replaced on every event
}

// startHocuspocusServer starts the server on a free port with the options
// in extra; it is killed at the end of the test.
func startHocuspocusServer(t *testing.T, extra ...string) *hpServer {
	t.Helper()
	requireNode(t)
	if _, err := os.Stat(filepath.Join("interop", "node_modules", "@hocuspocus", "server")); err != nil {
		msg := "@hocuspocus/server is not installed (run `npm ci` in interop/)"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	s := &hpServer{extra: extra, port: "0", stderr: newLogBuffer(), changed: make(chan struct{})}
	s.start(t)
	t.Cleanup(func() {
		s.kill(t)
		if t.Failed() {
			t.Logf("hocuspocus-server %s events:\n%s", s.port, s.dump())
			if s.stderr.String() != "" {
				t.Logf("hocuspocus-server %s stderr:\n%s", s.port, s.stderr.String())
			}
		}
	})
	return s
}

// url is the server's ws:// URI, the relay's --server.
func (s *hpServer) url() string { return "ws://127.0.0.1:" + s.port + "/" }

// start runs the server on s.port and waits until it listens.
func (s *hpServer) start(t *testing.T) {
	t.Helper()
	s.mu.Lock()
	s.run++
	run := s.run
	s.mu.Unlock()
	note := func(line string) { s.note(run, line) }
	s.proc, s.port = startNode(t, s.stderr, note, "hocuspocus-server.mjs", append([]string{"--port", s.port}, s.extra...)...)
}

// note records one event line of the server's run.
func (s *hpServer) note(run int, line string) {
	kind, rest, _ := strings.Cut(line, " ")
	e := hpEvent{kind: kind, run: run}
	switch kind {
	case "connect", "disconnect":
		fmt.Sscan(rest, &e.n)
	case "auth-ok", "auth-denied", "doc-closed":
		n, doc, _ := strings.Cut(rest, " ")
		fmt.Sscan(n, &e.n)
		json.Unmarshal([]byte(doc), &e.doc)
	case "loaded", "unloaded":
		json.Unmarshal([]byte(rest), &e.doc)
	default:
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.events = append(s.events, e)
	close(s.changed)
	s.changed = make(chan struct{})
}

// kill ends the server at once, as a crash would: no close frames. Its
// connections and documents are gone with it.
func (s *hpServer) kill(t *testing.T) {
	s.proc.kill()
	s.proc = nil
}

// waitUntil waits until cond, called with s.mu held, holds after some
// event, or fails the test after testTimeout naming what.
func (s *hpServer) waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(testTimeout)
	for {
		s.mu.Lock()
		ok, changed := cond(), s.changed
		s.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("hocuspocus-server %s: timed out waiting until %s; events:\n%s", s.port, what, s.dump())
		}
	}
}

// find returns the events of the latest run (every run if all) that match
// kind and, unless "", doc. s.mu must be held.
func (s *hpServer) find(all bool, kind, doc string) []hpEvent {
	var out []hpEvent
	for _, e := range s.events {
		if (all || e.run == s.run) && e.kind == kind && (doc == "" || e.doc == doc) {
			out = append(out, e)
		}
	}
	return out
}

// waitAuthenticated waits until, in the latest run, each document has been
// authenticated on the given number of WebSockets (at least), and returns
// the numbers of those WebSockets per document, in order.
func (s *hpServer) waitAuthenticated(t *testing.T, want map[string]int) map[string][]int {
	t.Helper()
	got := map[string][]int{}
	s.waitUntil(t, fmt.Sprintf("documents are authenticated on %v WebSockets", want), func() bool {
		clear(got)
		for doc, n := range want {
			for _, e := range s.find(false, "auth-ok", doc) {
				got[doc] = append(got[doc], e.n)
			}
			if len(got[doc]) < n {
				return false
			}
		}
		return true
	})
	return got
}

// history returns a copy of every event so far.
func (s *hpServer) history() []hpEvent {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.events)
}

// dump renders every event, one a line, for a failure message.
func (s *hpServer) dump() string {
	var b strings.Builder
	for _, e := range s.history() {
		fmt.Fprintf(&b, "  run %d: %s %d %q\n", e.run, e.kind, e.n, e.doc)
	}
	return b.String()
}

// startHocuspocusRelay runs the relay in --protocol hocuspocus mode against
// srv, with the flags in extra (such as --token). It waits only until the
// relay listens.
func startHocuspocusRelay(t *testing.T, srv *hpServer, extra ...string) *relayProcess {
	t.Helper()
	return launchRelay(t, "0", append([]string{"--protocol", "hocuspocus", "--server", srv.url()}, extra...)...)
}

// joinHocuspocus adds an editor that uses a HocuspocusProvider with token
// straight on the Hocuspocus server at url.
func (e *editors) joinHocuspocus(t *testing.T, name, url, doc, token string) {
	t.Helper()
	e.do(t, map[string]any{"cmd": "join", "name": name, "url": url, "doc": doc, "hocuspocus": true, "token": token})
}

// checkAwareness waits until every editor in report sees every editor of
// its document (editorsOf), sooner than the 15 s renewal, and then checks
// that it sees no one else.
func checkAwareness(t *testing.T, ed *editors, report []editorReport, editorsOf map[string][]string) {
	t.Helper()
	for _, r := range report {
		for _, other := range editorsOf[r.Doc] {
			ed.do(t, map[string]any{"cmd": "awareness", "name": r.Name, "of": other, "present": true, "timeoutMs": 5000})
		}
	}
	for _, r := range ed.do(t, map[string]any{"cmd": "report"}).Report {
		if want := editorsOf[r.Doc]; !slices.Equal(r.Awareness, want) {
			t.Errorf("%s on %q sees awareness of %v, want %v", r.Name, r.Doc, r.Awareness, want)
		}
	}
}

// hpDocs are the documents of the multi-document tests: their names go
// into the frames as they are, so odd ones must arrive unchanged.
var hpDocs = []string{"notes", "Grüße", "100% sure|[v2]{x}"}

// TestInteropHocuspocusServerAlone checks the test server and the
// HocuspocusProvider editors without a relay: editors straight on the
// server converge and see each other, a wrong token is refused with the
// server's reason, and the server reports it all.
func TestInteropHocuspocusServerAlone(t *testing.T) {
	srv := startHocuspocusServer(t, "--token", hpToken)
	ed := startEditors(t)
	ed.joinHocuspocus(t, "alice", srv.url(), "notes", hpToken)
	ed.joinHocuspocus(t, "bob", srv.url(), "notes", hpToken)
	ed.joinHocuspocus(t, "carol", srv.url(), "plans", hpToken)
	a := ed.try(t, map[string]any{"cmd": "join", "name": "mallory", "url": srv.url(), "doc": "notes", "hocuspocus": true, "token": "wrong", "timeoutMs": 5000})
	if a.OK || !strings.Contains(a.Error, hpRefusal) {
		t.Errorf("join with a wrong token: %+v, want a failure naming %q", a, hpRefusal)
	}
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 3})
	report := ed.convergeWithin(t, syncBound)
	checkAwareness(t, ed, report, map[string][]string{"notes": {"alice", "bob"}, "plans": {"carol"}})
	srv.waitAuthenticated(t, map[string]int{"notes": 2, "plans": 1})
	srv.waitUntil(t, "mallory was refused", func() bool { return len(srv.find(true, "auth-denied", "notes")) == 1 })
}

// startRedis runs redis-server on a loopback port the OS picked, without
// persistence, and returns the port; it is killed at the end of the test.
// Without redis-server the test is skipped, or fails in CI.
func startRedis(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		msg := "redis-server not found (Debian: apt-get install redis-server)"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	ln.Close()
	cmd := exec.Command(bin, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	out := newLogBuffer()
	cmd.Stdout = out
	cmd.Stderr = out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("redis-server log:\n%s", out.String())
		}
	})
	deadline := time.After(testTimeout)
	for {
		select {
		case line := <-out.lines:
			if strings.Contains(line, "Ready to accept connections") {
				return port
			}
		case err := <-done:
			done <- err // for the cleanup
			t.Fatalf("redis-server exited (%v):\n%s", err, out.String())
		case <-deadline:
			t.Fatalf("redis-server did not get ready:\n%s", out.String())
		}
	}
}

// TestInteropHocuspocusRedisServersAlone checks the scale-out without a
// relay: HocuspocusProvider editors on two server instances that share one
// Redis converge and see each other.
func TestInteropHocuspocusRedisServersAlone(t *testing.T) {
	redis := startRedis(t)
	s1 := startHocuspocusServer(t, "--redis-port", redis, "--token", hpToken)
	s2 := startHocuspocusServer(t, "--redis-port", redis, "--token", hpToken)
	ed := startEditors(t)
	ed.joinHocuspocus(t, "alice", s1.url(), "notes", hpToken)
	ed.joinHocuspocus(t, "bob", s2.url(), "notes", hpToken)
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 3})
	report := ed.convergeWithin(t, syncBound)
	checkAwareness(t, ed, report, map[string][]string{"notes": {"alice", "bob"}})
}

func TestInteropHocuspocusTwoRelaysThreeDocuments(t *testing.T) {
	srv := startHocuspocusServer(t, "--token", hpToken)
	// The token three ways: flag, file (first line, mode 0600) and
	// environment, with the protocol from the environment too.
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(hpToken+"\nnot this line\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	relays := []*relayProcess{
		startHocuspocusRelay(t, srv, "--token", hpToken),
		startHocuspocusRelay(t, srv, "--token-file", tokenFile),
		launchRelayEnv(t, []string{"ELVA_PROTOCOL=hocuspocus", "ELVA_TOKEN=" + hpToken}, "0", "--server", srv.url()),
	}
	ed := startEditors(t)
	editorsOf := map[string][]string{} // doc → its editors, sorted
	for i, doc := range hpDocs {
		// Two on the first relay, one on each other relay, one on the server.
		for _, j := range []struct{ who, url string }{
			{"ann", "ws://" + relays[0].addr}, {"ben", "ws://" + relays[0].addr},
			{"cat", "ws://" + relays[1].addr}, {"dan", srv.url()}, {"eve", "ws://" + relays[2].addr},
		} {
			name := fmt.Sprintf("%s%d", j.who, i)
			if j.who == "dan" {
				ed.joinHocuspocus(t, name, j.url, doc, hpToken)
			} else {
				ed.join(t, name, j.url, doc)
			}
			editorsOf[doc] = append(editorsOf[doc], name)
		}
		slices.Sort(editorsOf[doc])
	}
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 5})
	report := ed.convergeWithin(t, syncBound) // one document each, isolated
	// Every editor sees every editor of its document, wherever it is.
	checkAwareness(t, ed, report, editorsOf)

	// The server authenticated each document once per relay and once for
	// dan: the relays' three WebSockets carry all three documents each, the
	// provider's one each.
	want := map[string]int{}
	for _, doc := range hpDocs {
		want[doc] = len(relays) + 1
	}
	sockets := srv.waitAuthenticated(t, want)
	docsOn := map[int][]string{} // WebSocket → its documents
	for doc, ns := range sockets {
		if len(ns) != want[doc] {
			t.Errorf("document %q was authenticated %d times, want %d", doc, len(ns), want[doc])
		}
		for _, n := range ns {
			docsOn[n] = append(docsOn[n], doc)
		}
	}
	var multiplexed int
	for n, docs := range docsOn {
		switch len(docs) {
		case len(hpDocs):
			multiplexed++
		case 1: // a provider
		default:
			t.Errorf("WebSocket %d authenticated %q", n, docs)
		}
	}
	if multiplexed != len(relays) {
		t.Errorf("%d WebSockets carry every document, want one per relay (%d): %v", multiplexed, len(relays), docsOn)
	}
	for _, e := range srv.history() {
		if e.doc != "" && !slices.Contains(hpDocs, e.doc) {
			t.Errorf("the server saw %s of document %q", e.kind, e.doc)
		}
		if e.kind == "auth-denied" || e.kind == "doc-closed" || e.kind == "disconnect" {
			t.Errorf("the server saw %s %d %q", e.kind, e.n, e.doc)
		}
	}
	for i, r := range relays {
		if n := strings.Count(r.logs.String(), logUpstreamConnected); n != 1 {
			t.Errorf("relay %d logged %d lines with %s, want 1", i+1, n, logUpstreamConnected)
		}
		checkUpstreams(t, r, logUpstreamAuthenticated, 1, hpDocs...)
	}
}

func TestInteropHocuspocusWrongTokenStaysLocal(t *testing.T) {
	srv := startHocuspocusServer(t, "--token", hpToken)
	relay := startHocuspocusRelay(t, srv, "--token", "wrong", "--retry-max", "1s")
	local := startEditors(t)
	local.join(t, "alice", "ws://"+relay.addr, "notes")
	local.join(t, "bob", "ws://"+relay.addr, "notes")
	remote := startEditors(t)
	remote.joinHocuspocus(t, "dave", srv.url(), "notes", hpToken)
	line := relay.waitLog(t, logUpstreamRefusedDoc)
	if !strings.Contains(line, logAttr("doc", "notes")) || !strings.Contains(line, hpRefusal) {
		t.Errorf("refusal logged as %q, want %s and the server's reason %q", line, logAttr("doc", "notes"), hpRefusal)
	}
	// Some 1.5 s of typing, longer than any retry delay (--retry-max 1s):
	// the refusal is not logged again meanwhile.
	local.do(t, map[string]any{"cmd": "startEditing", "intervalMs": 20})
	local.do(t, map[string]any{"cmd": "waitEdits", "count": 75})
	local.do(t, map[string]any{"cmd": "stopEditing"})
	report := local.convergeWithin(t, syncBound) // among alice and bob
	local.do(t, map[string]any{"cmd": "awareness", "name": "alice", "of": "bob", "present": true, "timeoutMs": 5000})
	local.do(t, map[string]any{"cmd": "awareness", "name": "bob", "of": "alice", "present": true, "timeoutMs": 5000})

	if got := docLines(relay.logs.String(), logUpstreamRefusedDoc, "notes"); len(got) != 1 {
		t.Errorf("%d log lines with %s for notes, want 1:\n%s", len(got), logUpstreamRefusedDoc, strings.Join(got, ""))
	}
	checkUpstreams(t, relay, logUpstreamAuthenticated, 0, "notes")
	// Nothing of the refused document reached the server's editor.
	remote.do(t, map[string]any{"cmd": "awareness", "name": "dave", "of": "alice", "present": false, "timeoutMs": 1000})
	for _, r := range remote.do(t, map[string]any{"cmd": "report"}).Report {
		for _, tok := range madeByDoc(report)["notes"] {
			if strings.Contains(r.Text, tok) {
				t.Errorf("%s on the server has %s from the refused relay", r.Name, tok)
			}
		}
	}
	srv.waitUntil(t, "the relay was refused", func() bool { return len(srv.find(true, "auth-denied", "notes")) > 0 })
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if ok := srv.find(true, "auth-ok", "notes"); len(ok) != 1 {
		t.Errorf("notes was authenticated %d times, want once (dave)", len(ok))
	}
	if denied := srv.find(true, "auth-denied", ""); len(denied) != 1 {
		t.Errorf("the server refused %d auth messages, want 1 (the relay's, on its one connection)", len(denied))
	}
}

func TestInteropHocuspocusServerRestartWhileTyping(t *testing.T) {
	srv := startHocuspocusServer(t, "--token", hpToken)
	r1 := startHocuspocusRelay(t, srv, "--token", hpToken, "--retry-max", "1s")
	r2 := startHocuspocusRelay(t, srv, "--token", hpToken, "--retry-max", "1s")
	ed := startEditors(t)
	ed.join(t, "alice", "ws://"+r1.addr, "notes")
	ed.join(t, "bob", "ws://"+r1.addr, "notes")
	ed.join(t, "carol", "ws://"+r2.addr, "notes")
	ed.join(t, "dave", "ws://"+r1.addr, "plans")
	ed.join(t, "erin", "ws://"+r2.addr, "plans")
	// frank is on the server itself and comes back on his own.
	ed.do(t, map[string]any{"cmd": "join", "name": "frank", "url": srv.url(), "doc": "notes", "hocuspocus": true, "token": hpToken, "maxBackoffMs": 200})
	up := map[string]int{"notes": 3, "plans": 2}
	srv.waitAuthenticated(t, up)
	ed.do(t, map[string]any{"cmd": "startEditing", "intervalMs": 20})
	const outages = 2
	for range outages {
		ed.do(t, map[string]any{"cmd": "waitEdits", "count": 5})
		srv.kill(t) // and every document with it: it keeps them in memory
		ed.do(t, map[string]any{"cmd": "waitEdits", "count": 5})
		srv.start(t)
		srv.waitAuthenticated(t, up) // both relays and frank are back
	}
	ed.do(t, map[string]any{"cmd": "waitEdits", "count": 5})
	ed.do(t, map[string]any{"cmd": "stopEditing"})
	ed.convergeWithin(t, syncBound)
	// plans lives only in the relays' editors: what the restarted server
	// has of it came from their resyncs. Fresh editors on the server get
	// everything from the server alone.
	fresh := startEditors(t)
	fresh.joinHocuspocus(t, "fresh1", srv.url(), "notes", hpToken)
	fresh.joinHocuspocus(t, "fresh2", srv.url(), "plans", hpToken)
	fresh.convergeWith(t, madeByDoc(ed.do(t, map[string]any{"cmd": "report"}).Report))
	// One socket per relay, and one more after each restart; each document
	// authenticated on each.
	for i, r := range []*relayProcess{r1, r2} {
		if n := strings.Count(r.logs.String(), logUpstreamConnected); n != outages+1 {
			t.Errorf("relay %d logged %d lines with %s, want %d", i+1, n, logUpstreamConnected, outages+1)
		}
		checkUpstreams(t, r, logUpstreamAuthenticated, outages+1, "notes", "plans")
	}
}

func TestInteropHocuspocusIdleRelayStaysConnected(t *testing.T) {
	const timeout = 2 * time.Second // the server's ping interval and pong deadline
	srv := startHocuspocusServer(t, "--token", hpToken, "--timeout", fmt.Sprint(timeout.Milliseconds()))
	relay := startHocuspocusRelay(t, srv, "--token", hpToken)
	ed := startEditors(t)
	ed.join(t, "alice", "ws://"+relay.addr, "notes")
	relaySocket := srv.waitAuthenticated(t, map[string]int{"notes": 1})["notes"][0]
	ed.join(t, "bob", "ws://"+relay.addr, "notes")
	ed.joinHocuspocus(t, "carol", srv.url(), "notes", hpToken)
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 2})
	ed.convergeWithin(t, syncBound)

	// The idle period is the thing under test, not a synchronisation: for
	// five of the server's timeouts nobody types (awareness renewals come
	// every 15 s, so none need fall in it), and only the relay's answers to
	// the server's pings keep its documents. Hocuspocus 3.4.4 ends every
	// document of a connection that missed one pong (type 7, "Connection
	// Timeout") and keeps doing so at each later tick.
	time.Sleep(5 * timeout)

	for _, e := range srv.history() {
		if e.n == relaySocket && (e.kind == "disconnect" || e.kind == "doc-closed") {
			t.Errorf("the server saw %s of the relay's WebSocket %d (document %q)", e.kind, e.n, e.doc)
		}
	}
	if n := strings.Count(relay.logs.String(), logUpstreamConnected); n != 1 {
		t.Errorf("the relay logged %d lines with %s, want 1", n, logUpstreamConnected)
	}
	checkUpstreams(t, relay, logUpstreamAuthenticated, 1, "notes")
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 1})
	ed.convergeWithin(t, syncBound)
}

func TestInteropHocuspocusScaleOutOverRedis(t *testing.T) {
	redis := startRedis(t)
	s1 := startHocuspocusServer(t, "--redis-port", redis, "--token", hpToken)
	s2 := startHocuspocusServer(t, "--redis-port", redis, "--token", hpToken)
	r1 := startHocuspocusRelay(t, s1, "--token", hpToken)
	r2 := startHocuspocusRelay(t, s2, "--token", hpToken)
	ed := startEditors(t)
	ed.join(t, "alice", "ws://"+r1.addr, "notes")
	ed.join(t, "bob", "ws://"+r1.addr, "notes")
	ed.join(t, "carol", "ws://"+r2.addr, "notes")
	ed.join(t, "dave", "ws://"+r1.addr, "plans")
	ed.join(t, "erin", "ws://"+r2.addr, "plans")
	ed.joinHocuspocus(t, "frank", s2.url(), "plans", hpToken)
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 5})
	report := ed.convergeWithin(t, syncBound)
	checkAwareness(t, ed, report, map[string][]string{"notes": {"alice", "bob", "carol"}, "plans": {"dave", "erin", "frank"}})
	s1.waitAuthenticated(t, map[string]int{"notes": 1, "plans": 1})
	s2.waitAuthenticated(t, map[string]int{"notes": 1, "plans": 2})
}

// hpFrame prefixes msg with doc as Hocuspocus frames do: varString(doc).
func hpFrame(doc string, msg ...byte) []byte {
	return append(append(appendVaruint(nil, uint64(len(doc))), doc...), msg...)
}

// hpAuth is the auth message a client sends for doc: 02 00 varString(token).
func hpAuth(doc, token string) []byte {
	return hpFrame(doc, append(appendVaruint([]byte{2, 0}, uint64(len(token))), token...)...)
}

// hpReceive reads the next frame and fails the test unless it is of doc
// and its message starts with prefix; it returns the message.
func hpReceive(t *testing.T, ws *websocket.Conn, doc string, prefix []byte, what string) []byte {
	t.Helper()
	frame := receive(t, ws)
	n, k, err := readVaruint(frame)
	if err != nil || uint64(len(frame)-k) < n || string(frame[k:k+int(n)]) != doc {
		t.Fatalf("%s: frame % x is not of document %q", what, frame, doc)
	}
	msg := frame[k+int(n):]
	if !bytes.HasPrefix(msg, prefix) {
		t.Fatalf("%s: got % x, want % x…", what, msg, prefix)
	}
	return msg
}

// TestInteropHocuspocusServerWireFacts pins, on a raw WebSocket, the
// behaviour of Hocuspocus 3.4.4 that the relay's hocuspocus mode relies on
// (PROTOCOL.md §4): a document's frames sent before its auth are held and
// handled after it; the server answers a step 1 with its own step 1 and
// then step 2; it sends a client's own update and awareness back to it,
// and a sync status after every update; a client's close (type 7) is
// answered with a close, the document is dropped from memory when that was
// its last connection, and the document's frames wait for a new auth; a
// refused token gets PermissionDenied with the server's reason.
// (x/net/websocket answers the server's pings by itself.)
func TestInteropHocuspocusServerWireFacts(t *testing.T) {
	srv := startHocuspocusServer(t, "--token", hpToken)
	ws := dialLocal(t, "127.0.0.1:"+srv.port, "")
	// Two Yjs updates of client 4242 on Y.Text "t": "a", then "b" after it.
	update1 := unhex(t, "010192210004010174016100")
	update2 := unhex(t, "010192210184922100016200")
	updateMsg := func(u []byte) []byte {
		return append(appendVaruint([]byte{msgSync, syncUpdate}, uint64(len(u))), u...)
	}
	const doc = "w"

	// Step 1 and awareness before the auth: held, then handled in order.
	send(t, ws, hpFrame(doc, step1...))
	send(t, ws, hpFrame(doc, awarenessMsg(4242, 1, `{"user":{"name":"raw"}}`)...))
	send(t, ws, hpAuth(doc, hpToken))
	hpReceive(t, ws, doc, append([]byte{2, 2, 10}, "read-write"...), "Authenticated")
	hpReceive(t, ws, doc, []byte{msgSync, syncStep1}, "the server's step 1, first")
	hpReceive(t, ws, doc, []byte{msgSync, syncStep2}, "then its step 2")
	hpReceive(t, ws, doc, []byte{msgAwareness}, "our own awareness, sent back")

	// An update comes back to its sender, then the sync status "applied";
	// one that changes nothing gets the status only.
	send(t, ws, hpFrame(doc, updateMsg(update1)...))
	if got := hpReceive(t, ws, doc, []byte{msgSync, syncUpdate}, "our update, sent back"); !bytes.Equal(got, updateMsg(update1)) {
		t.Errorf("echo % x, want % x", got, updateMsg(update1))
	}
	hpReceive(t, ws, doc, []byte{8, 1}, "sync status applied")
	send(t, ws, hpFrame(doc, updateMsg(update1)...))
	hpReceive(t, ws, doc, []byte{8, 1}, "sync status only, for an update the server has")

	// A client's close: the server removes our awareness and closes the
	// document (not the socket). Later frames wait for a new auth.
	send(t, ws, hpFrame(doc, 7))
	hpReceive(t, ws, doc, []byte{msgAwareness}, "our awareness removed")
	hpReceive(t, ws, doc, append([]byte{7, 18}, "provider_initiated"...), "the server's close")
	// Its last connection gone, the server drops the document from memory:
	// a new auth starts from an empty document, so update1 is new again.
	srv.waitUntil(t, "the document is closed and unloaded", func() bool {
		return len(srv.find(false, "doc-closed", doc)) == 1 && len(srv.find(false, "unloaded", doc)) == 1
	})
	send(t, ws, hpFrame(doc, updateMsg(update1)...))
	send(t, ws, hpAuth(doc, hpToken))
	hpReceive(t, ws, doc, append([]byte{2, 2, 10}, "read-write"...), "Authenticated again")
	hpReceive(t, ws, doc, updateMsg(update1), "the held update, applied and sent back")
	hpReceive(t, ws, doc, []byte{8, 1}, "sync status applied")
	// And the next one, on the document the new auth opened.
	send(t, ws, hpFrame(doc, updateMsg(update2)...))
	hpReceive(t, ws, doc, updateMsg(update2), "update2, sent back")
	hpReceive(t, ws, doc, []byte{8, 1}, "sync status applied")

	// A wrong token on another document of the same socket.
	send(t, ws, hpAuth("other", "wrong"))
	reason := hpReceive(t, ws, "other", []byte{2, 1}, "PermissionDenied")
	if want := append(appendVaruint([]byte{2, 1}, uint64(len(hpRefusal))), hpRefusal...); !bytes.Equal(reason, want) {
		t.Errorf("PermissionDenied % x, want % x (%q)", reason, want, hpRefusal)
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if n := len(srv.find(true, "connect", "")); n != 1 {
		t.Errorf("%d WebSockets, want the one", n)
	}
}

func TestInteropHocuspocusNoEchoNoHocuspocusMessages(t *testing.T) {
	srv := startHocuspocusServer(t, "--token", hpToken)
	relay := startHocuspocusRelay(t, srv, "--token", hpToken)
	ed := startEditors(t)
	ed.joinHocuspocus(t, "pat", srv.url(), "echo", hpToken)
	// x is a raw editor on the relay: it sends one update (the token
	// "[x:0]" of client 4242 in Y.Text "text") and reads what comes back.
	x := dialLocal(t, relay.addr, "echo")
	own := unhex(t, "010192210004010474657874055b783a305d00")
	send(t, x, append(appendVaruint([]byte{msgSync, syncUpdate}, uint64(len(own))), own...))
	ed.convergeWith(t, map[string][]string{"echo": {"[x:0]"}}) // pat has it
	// The server sent x's update back to the relay (it echoes to the
	// sender) in the same loop that sent it to pat, and pat edits only now:
	// the relay reads pat's update after that echo. So the first update x gets must
	// be pat's, and nothing Hocuspocus-only (auth, stateless, close, sync
	// status: the server sent one for x's update) may come before it.
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 1, "names": []string{"pat"}})
	for {
		msg := receive(t, x)
		if len(msg) == 0 || (msg[0] != msgSync && msg[0] != msgAwareness && msg[0] != msgQueryAwareness) {
			t.Fatalf("x got % x: not a y-websocket message", msg)
		}
		if !bytes.HasPrefix(msg, []byte{msgSync, syncUpdate}) {
			continue // step 1 and 2 of the relay's resync, awareness
		}
		if bytes.Contains(msg, []byte("[x:0]")) {
			t.Fatalf("x got its own update back: % x", msg)
		}
		if !bytes.Contains(msg, []byte("[pat:0]")) {
			t.Fatalf("x got an update that is not pat's: % x", msg)
		}
		break
	}
	checkUpstreams(t, relay, logUpstreamAuthenticated, 1, "echo")
}

// The tests below cover the local document store (--data-dir): what the
// relay keeps across a stop and a crash, what it delivers to a server that
// was down meanwhile, and how it copes with odd names, a damaged file, a
// data directory it cannot use and a full disk.

// The relay's log messages that the store tests rely on.
const (
	logStandalone  = "no server: documents stay on this machine"
	logOwed        = "documents owe the server edits"
	logStillOwed   = "documents still owe the server edits"
	logDelivered   = "server has every edit"
	logCorruptTail = "torn or corrupt tail"
	logLevelError  = "level=ERROR"
)

// joinAll adds an editor for each name in docs (name → document) on the
// relay or server at url, in the order of the names.
func (e *editors) joinAll(t *testing.T, url string, docs map[string]string) {
	t.Helper()
	for _, name := range slices.Sorted(maps.Keys(docs)) {
		e.join(t, name, url, docs[name])
	}
}

// leaveAll makes every editor leave: their sockets close, and they are in
// no later report.
func (e *editors) leaveAll(t *testing.T) {
	t.Helper()
	for _, r := range e.do(t, map[string]any{"cmd": "report"}).Report {
		e.do(t, map[string]any{"cmd": "leave", "name": r.Name})
	}
}

// logLines returns the lines of logs that contain every one of substrs.
func logLines(logs string, substrs ...string) []string {
	var out []string
	for line := range strings.Lines(logs) {
		if !slices.ContainsFunc(substrs, func(s string) bool { return !strings.Contains(line, s) }) {
			out = append(out, line)
		}
	}
	return out
}

// typeOnRelay runs the relay with args, and editors on it (name →
// document) that make rounds edits each and converge. It returns the
// relay, the editors and their edits by document.
func typeOnRelay(t *testing.T, editorsOn map[string]string, rounds int, args ...string) (*relayProcess, *editors, map[string][]string) {
	t.Helper()
	relay := launchRelay(t, "0", args...)
	ed := startEditors(t)
	ed.joinAll(t, "ws://"+relay.addr, editorsOn)
	ed.do(t, map[string]any{"cmd": "edit", "rounds": rounds})
	return relay, ed, madeByDoc(ed.convergeWithin(t, syncBound))
}

// storeSession is typeOnRelay on the data directory dir, after which the
// editors leave and the relay stops (SIGTERM).
func storeSession(t *testing.T, dir string, editorsOn map[string]string, rounds int) (*relayProcess, map[string][]string) {
	t.Helper()
	relay, ed, made := typeOnRelay(t, editorsOn, rounds, "--data-dir", dir)
	ed.leaveAll(t)
	relay.stop(t)
	return relay, made
}

// reopenStore runs the relay on dir again with fresh editors (name →
// document), which must get every edit in made (and none of another
// document) from it alone: no old editor is left to reconnect, should the
// relay even get its old port. It returns the relay, running.
func reopenStore(t *testing.T, dir string, editorsOn map[string]string, made map[string][]string) *relayProcess {
	t.Helper()
	relay := launchRelay(t, "0", "--data-dir", dir)
	fresh := startEditors(t)
	fresh.joinAll(t, "ws://"+relay.addr, editorsOn)
	fresh.convergeWith(t, made)
	fresh.leaveAll(t)
	return relay
}

func TestInteropStoreLocalOnly(t *testing.T) {
	dir := t.TempDir()
	relay, made := storeSession(t, dir, map[string]string{"alice": "notes", "bob": "notes", "carol": "plans"}, 5)
	local := filepath.Join(dir, "local") // a standalone relay's documents
	if got := logLines(relay.logs.String(), logStandalone); len(got) != 1 || !strings.Contains(got[0], logAttr("data_dir", local)) {
		t.Errorf("lines with %q: %q, want one with %s", logStandalone, got, logAttr("data_dir", local))
	}
	reopenStore(t, dir, map[string]string{"dave": "notes", "erin": "plans"}, made)
}

// storeServer is an upstream that is down while editors type and starts
// later on a port picked beforehand: the relay's flags for it, its start,
// and a check that it has every edit in made (document → edits).
type storeServer struct {
	args  []string
	start func(t *testing.T)
	check func(t *testing.T, made map[string][]string)
}

// persistentELVAServer is elva-server.mjs in persistent mode, not started;
// the check reads the server's own documents.
func persistentELVAServer(t *testing.T) storeServer {
	srv := newNodeServer(t, "persistent", freePort(t))
	return storeServer{
		args:  []string{"--server", srv.url()},
		start: srv.start,
		check: func(t *testing.T, made map[string][]string) {
			var report []editorReport
			for doc := range made {
				report = append(report, editorReport{Name: "the server", Doc: doc, Text: srv.text(t, doc)})
			}
			checkEdits(t, report, made)
		},
	}
}

// referenceYjsServer is @y/websocket-server (yjs-server.mjs), not started,
// for a relay in --protocol yjs mode; the check joins fresh editors on
// the server itself.
func referenceYjsServer(t *testing.T) storeServer {
	srv := newYjsServer(t, freePort(t))
	return storeServer{
		args:  []string{"--protocol", "yjs", "--server", srv.url(), "--upstream-grace", "100ms"},
		start: srv.start,
		check: func(t *testing.T, made map[string][]string) {
			fresh := startEditors(t)
			for doc := range made {
				fresh.join(t, "fresh-"+doc, srv.url(), doc)
			}
			fresh.convergeWith(t, made)
		},
	}
}

// TestInteropStoreOfflineDelivery: with the server down, editors type on
// two documents; the relay stops (every editor gone, SIGTERM) or crashes
// (editors idle for a second, SIGKILL); it starts again and says what it
// owes; then the server comes up, with no editor anywhere, and gets every
// edit from the relay's store alone, which the relay confirms per
// document.
func TestInteropStoreOfflineDelivery(t *testing.T) {
	servers := []struct {
		name string
		make func(t *testing.T) storeServer
	}{
		{"persistent ELVA server", persistentELVAServer},
		{"y-websocket server", referenceYjsServer},
	}
	stops := []struct {
		name string
		stop func(t *testing.T, relay *relayProcess, ed *editors)
	}{
		{"SIGTERM after the editors left", func(t *testing.T, relay *relayProcess, ed *editors) {
			ed.leaveAll(t)
			relay.stop(t)
			if !strings.Contains(relay.logs.String(), logStillOwed) {
				t.Errorf("the relay did not log at its stop that documents %s", logStillOwed)
			}
		}},
		{"SIGKILL after a second of idle editors", func(t *testing.T, relay *relayProcess, ed *editors) {
			// The idle second is the scenario, not a wait for an event:
			// the last group is on disk after --fsync-interval (100 ms).
			time.Sleep(time.Second)
			relay.kill(t)
			ed.leaveAll(t)
		}},
	}
	for _, s := range servers {
		for _, stop := range stops {
			t.Run(s.name+"/"+stop.name, func(t *testing.T) {
				srv := s.make(t)
				dir := t.TempDir()
				args := append([]string{"--data-dir", dir, "--retry-max", "1s"}, srv.args...)
				relay, ed, made := typeOnRelay(t, map[string]string{"alice": "notes", "bob": "notes", "carol": "plans"}, 5, args...)
				stop.stop(t, relay, ed)

				relay = launchRelay(t, "0", args...)
				line := relay.waitLog(t, logOwed)
				for doc := range made {
					if !strings.Contains(line, doc) {
						t.Errorf("the relay's start line %q does not name %s", line, doc)
					}
				}
				srv.start(t)
				for delivered := map[string]bool{}; len(delivered) < len(made); {
					line := relay.waitLog(t, logDelivered)
					for doc := range made {
						delivered[doc] = delivered[doc] || strings.Contains(line, logAttr("doc", doc))
					}
				}
				srv.check(t, made)
			})
		}
	}
}

// TestInteropStoreOfflineEditorBroadcast: alice, alone on her relay, edits
// with her socket down while bob and carol edit on another relay; the
// server only passes messages on (broadcast mode). When she is back
// everyone converges, and so does dave, who opens the document on a third
// relay that never saw it.
func TestInteropStoreOfflineEditorBroadcast(t *testing.T) {
	srv := startNodeServer(t, "broadcast")
	var urls []string
	for range 3 {
		urls = append(urls, "ws://"+startRelayProcess(t, "--server", srv.url(), "--data-dir", t.TempDir()).addr)
	}
	ed := startEditors(t)
	ed.join(t, "alice", urls[0], "notes")
	ed.join(t, "bob", urls[1], "notes")
	ed.join(t, "carol", urls[1], "notes")
	editWhileAway(t, ed) // alice and bob edit while she is away
	ed.join(t, "dave", urls[2], "notes")
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 1})
	ed.convergeWithin(t, syncBound)
}

// TestInteropStoreOddNames: a name that would climb out of the data
// directory as a path, and two that differ only in case, are three
// documents that stay apart across a restart, each one file directly in
// the data directory, 0600 in a 0700 directory, and nothing is written
// anywhere else.
func TestInteropStoreOddNames(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "a", "b", "data")
	const traversal = "../../etc/passwd"
	// A y-websocket client puts the room name into the URL as it is, and a
	// URL parser resolves "../" away: a client that means this name sends
	// it escaped, and the relay decodes it.
	docs := map[string]string{"pat": url.PathEscape(traversal), "una": "Doc", "lou": "doc"}
	_, made := storeSession(t, dir, docs, 3)
	reopenStore(t, dir, map[string]string{"pat2": docs["pat"], "una2": "Doc", "lou2": "doc"}, made).stop(t)

	if files := checkStoreTree(t, root, filepath.Join(dir, "local")); len(files) != len(docs) {
		t.Errorf("document files %q, want one per document (%d)", files, len(docs))
	}
	out, _, status := runStoreTool(t, "--data-dir", dir, "--list-docs")
	for _, name := range []string{traversal, "Doc", "doc"} {
		if status != 0 || !strings.Contains(out, strconv.Quote(name)) {
			t.Errorf("--list-docs (status %d) does not name %q:\n%s", status, name, out)
		}
	}
}

// checkStoreTree fails the test unless root holds nothing but the
// directories down to the data directory dir (0700) and, directly in it,
// regular files (0600), and returns the names of those that are document
// files.
func checkStoreTree(t *testing.T, root, dir string) []string {
	t.Helper()
	var docFiles []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case path == dir:
			if info.Mode().Perm() != 0o700 {
				t.Errorf("data directory %s has mode %v, want 0700", path, info.Mode().Perm())
			}
		case d.IsDir() && strings.HasPrefix(dir, path+string(filepath.Separator)):
		case filepath.Dir(path) == dir && info.Mode().IsRegular():
			if info.Mode().Perm() != 0o600 {
				t.Errorf("%s has mode %v, want 0600", path, info.Mode().Perm())
			}
			if strings.HasSuffix(path, docFileExt) {
				docFiles = append(docFiles, filepath.Base(path))
			}
		default:
			t.Errorf("%s (%v) is not a file directly in the data directory %s", path, info.Mode(), dir)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return docFiles
}

// runStoreTool runs the binary as a command-line tool (--list-docs,
// --remove-doc) and returns its output and exit status.
func runStoreTool(t *testing.T, args ...string) (stdout, stderr string, status int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, relayBinary(t), args...)
	cmd.Env = relayEnv(t)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("%v: %v", args, err)
	}
	return out.String(), errOut.String(), cmd.ProcessState.ExitCode()
}

// TestInteropStoreCorruptTail: after a stop, one document file gets a
// record cut short at its end and another bytes that are no record; the
// relay starts, warns once for each, and new editors get the content.
// Cut, the files need no warning at the next start.
func TestInteropStoreCorruptTail(t *testing.T) {
	dir := t.TempDir()
	_, made := storeSession(t, dir, map[string]string{"alice": "torn", "bob": "garbage"}, 3)
	record := appendRecord(nil, recUpdate, []byte("an update that never got to the disk whole"))
	tails := map[string][]byte{
		"torn":    record[:len(record)/2],
		"garbage": []byte("\xde\xad\xbe\xef not a record at all"),
	}
	for doc, tail := range tails {
		appendToFile(t, filepath.Join(dir, "local", docFileName(doc)), tail)
	}
	for run := range 2 {
		relay := reopenStore(t, dir, map[string]string{"tess": "torn", "gus": "garbage"}, made)
		relay.stop(t)
		want := 1 - run // a warning at the first start only
		for doc := range tails {
			if got := docLines(relay.logs.String(), logCorruptTail, doc); len(got) != want {
				t.Errorf("start %d: %d lines with %q for %s, want %d:\n%s", run+1, len(got), logCorruptTail, doc, want, strings.Join(got, ""))
			}
		}
	}
}

// appendToFile appends data to the file at path, which must exist.
func appendToFile(t *testing.T, path string, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestInteropStoreListAndRemove: after a run, --list-docs names the stored
// documents; --remove-doc removes one (and fails for one that is not
// there), and after a restart an editor finds that document empty while
// the other keeps its content.
func TestInteropStoreListAndRemove(t *testing.T) {
	dir := t.TempDir()
	_, made := storeSession(t, dir, map[string]string{"alice": "notes", "bob": "plans"}, 2)
	list := func(want ...string) {
		t.Helper()
		out, errOut, status := runStoreTool(t, "--data-dir", dir, "--list-docs")
		noun := "documents"
		if len(want) == 1 {
			noun = "document"
		}
		if status != 0 || !strings.Contains(out, fmt.Sprintf("%d %s in %s", len(want), noun, filepath.Join(dir, "local"))) {
			t.Errorf("--list-docs: status %d, want 0 and %d documents:\n%s%s", status, len(want), out, errOut)
		}
		for _, doc := range []string{"notes", "plans"} {
			if listed := strings.Contains(out, strconv.Quote(doc)); listed != slices.Contains(want, doc) {
				t.Errorf("--list-docs names %s: %v, want %v:\n%s", doc, listed, !listed, out)
			}
		}
		if strings.Contains(out, "owed") {
			t.Errorf("--list-docs marks a document owed, with no server:\n%s", out)
		}
	}
	list("notes", "plans")
	if out, errOut, status := runStoreTool(t, "--data-dir", dir, "--remove-doc", "notes"); status != 0 {
		t.Errorf("--remove-doc notes: status %d, want 0:\n%s%s", status, out, errOut)
	}
	if _, errOut, status := runStoreTool(t, "--data-dir", dir, "--remove-doc", "notes"); status != 1 || !strings.Contains(errOut, "notes") {
		t.Errorf("--remove-doc notes again: status %d, want 1 and a message naming it:\n%s", status, errOut)
	}
	list("plans")

	relay := launchRelay(t, "0", "--data-dir", dir)
	fresh := startEditors(t)
	fresh.joinAll(t, "ws://"+relay.addr, map[string]string{"carol": "notes", "dave": "plans"})
	fresh.do(t, map[string]any{"cmd": "edit", "rounds": 1, "names": []string{"carol"}})
	// erin gets what the store has of notes, carol's edit with it: so it
	// has nothing else only if the removal took it all.
	fresh.join(t, "erin", "ws://"+relay.addr, "notes")
	report := fresh.convergeWith(t, map[string][]string{"plans": made["plans"]})
	for _, r := range report {
		for _, tok := range made["notes"] {
			if strings.Contains(r.Text, tok) {
				t.Errorf("%s on %q has %s of the removed document", r.Name, r.Doc, tok)
			}
		}
	}
}

// TestInteropStoreCannotWrite: the store cannot write, because the data
// directory cannot be created (its parent is a regular file) or because
// the relay runs under a file-size limit that its document file outgrows,
// as on a full disk. The relay starts all the same, logs one error for it
// however often the store tries again, keeps relaying (editors converge, a
// newcomer gets everything from the store in memory) and stops with
// status 0.
func TestInteropStoreCannotWrite(t *testing.T) {
	const blocks = 64 // the file-size limit: 32 KiB in dash, 64 in bash
	tests := []struct {
		name   string
		launch func(t *testing.T) *relayProcess
		bigger int    // bytes of filler alice inserts before anyone types
		want   string // in the error
	}{
		{"data directory under a regular file", func(t *testing.T) *relayProcess {
			file := filepath.Join(t.TempDir(), "file")
			if err := os.WriteFile(file, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			return launchRelay(t, "0", "--data-dir", filepath.Join(file, "data"))
		}, 0, syscall.ENOTDIR.Error()},
		{"disk full", func(t *testing.T) *relayProcess {
			return launchRelayFileLimit(t, blocks, "0", "--data-dir", t.TempDir(), "--fsync-interval", "10ms")
		}, 2 * blocks * 1024, syscall.EFBIG.Error()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			relay := tt.launch(t)
			ed := startEditors(t)
			ed.joinAll(t, "ws://"+relay.addr, map[string]string{"alice": "notes", "bob": "notes"})
			if tt.bigger > 0 {
				ed.do(t, map[string]any{"cmd": "insert", "name": "alice", "bytes": tt.bigger})
			}
			// Typing for longer than the store waits before it tries
			// again: its next failure must not be logged again.
			const interval = 20 * time.Millisecond
			ed.do(t, map[string]any{"cmd": "startEditing", "intervalMs": interval.Milliseconds()})
			ed.do(t, map[string]any{"cmd": "waitEdits", "count": int(retryWrite/interval) + 25})
			ed.do(t, map[string]any{"cmd": "stopEditing"})
			made := madeByDoc(ed.convergeWithin(t, syncBound))
			ed.join(t, "carol", "ws://"+relay.addr, "notes")
			ed.convergeWith(t, made)
			relay.stop(t) // status 0
			if got := logLines(relay.logs.String(), logLevelError, "store"); len(got) != 1 || !strings.Contains(got[0], tt.want) {
				t.Errorf("%d error lines about the store, want 1 saying %q:\n%s", len(got), tt.want, strings.Join(got, ""))
			}
		})
	}
}

// loadShortTimeout bounds the load command's short mode, which builds two
// binaries and starts about twenty servers; it takes well under a minute.
const loadShortTimeout = 3 * time.Minute

// loadReport is the part of the load command's --json output the test
// reads: per server and workload, the result or the error.
type loadReport struct {
	OK       bool                                  `json:"ok"`
	Servers  []string                              `json:"servers"`
	Rawrelay bool                                  `json:"rawrelay"`
	Notes    []string                              `json:"notes"`
	Results  map[string]map[string]json.RawMessage `json:"results"`
	Table    string                                `json:"table"`
}

// TestLoadCommandShortMode runs the load command (interop/load.mjs) in its
// short mode, so that it cannot rot: it builds the relay, starts every
// server, completes every workload against each with 0 errors and prints
// its table. Its figures are measurements, not assertions: nothing here
// checks a time or a rate.
func TestLoadCommandShortMode(t *testing.T) {
	requireNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), loadShortTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", "load.mjs", "--short", "--json")
	cmd.Dir = "interop"
	// On the timeout, SIGTERM: the command then stops the servers it started.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 15 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if ctx.Err() != nil {
		t.Fatalf("load command did not finish within %v:\n%s", loadShortTimeout, stderr.String())
	}
	var report loadReport
	if jsonErr := json.Unmarshal(out, &report); jsonErr != nil {
		t.Fatalf("load command: %v; output not JSON (%v):\n%s\n%s", err, jsonErr, out, stderr.String())
	}
	t.Logf("\n%s", report.Table)
	if err != nil || !report.OK {
		t.Errorf("load command: exit %v, ok %v; want exit 0, ok true\n%s", err, report.OK, stderr.String())
	}
	want := []string{"elva", "elva-store", "yjs"}
	if report.Rawrelay {
		want = append(want, "rawrelay")
	} else if !slices.ContainsFunc(report.Notes, func(n string) bool { return strings.HasPrefix(n, "rawrelay unavailable") }) {
		t.Errorf("rawrelay left out without a note saying so; notes: %q", report.Notes)
	}
	for _, server := range want {
		if !slices.Contains(report.Servers, server) {
			t.Errorf("servers %q: want %s among them", report.Servers, server)
			continue
		}
		for _, workload := range []string{"a", "b", "c", "d", "e", "f"} {
			var r struct {
				Error  string `json:"error"`
				Errors int    `json:"errors"`
			}
			raw, ok := report.Results[server][workload]
			if !ok {
				t.Errorf("%s, workload %s: no result", server, workload)
				continue
			}
			if err := json.Unmarshal(raw, &r); err != nil {
				t.Errorf("%s, workload %s: %v", server, workload, err)
				continue
			}
			if r.Error != "" || r.Errors != 0 {
				t.Errorf("%s, workload %s: error %q, %d connection errors; want none", server, workload, r.Error, r.Errors)
			}
		}
	}
}

// TestInteropHocuspocusJoinAfterServerContent: an editor who opens a
// document through the relay while its Hocuspocus socket is up gets what
// the server had before. (With the store, the editor's step 1 is the
// store's to answer; the relay's own step 1 for a document new on the
// socket must still go upstream.)
func TestInteropHocuspocusJoinAfterServerContent(t *testing.T) {
	srv := startHocuspocusServer(t, "--token", hpToken)
	ed := startEditors(t)
	ed.joinHocuspocus(t, "dan", srv.url(), "notes", hpToken)
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 3, "names": []string{"dan"}})
	relay := startHocuspocusRelay(t, srv, "--token", hpToken)
	relay.waitLog(t, "upstream connected")
	ed.join(t, "ann", "ws://"+relay.addr, "notes")
	ed.convergeWithin(t, syncBound)
}

// The status page in a browser: interop/status-page.mjs opens status.html
// in headless Chromium (Debian's, driven by playwright-core) and reports
// what the page shows.

// chromiumPath is the browser the status page test runs: $CHROMIUM, else
// Debian's package (which .ci/run installs).
func chromiumPath() string {
	if p := os.Getenv("CHROMIUM"); p != "" {
		return p
	}
	return "/usr/bin/chromium"
}

// requireChromium skips or fails (in CI) the test when the browser, its
// driver (playwright-core in interop/node_modules) or Node is missing.
func requireChromium(t *testing.T) {
	t.Helper()
	requireNode(t)
	_, driverErr := os.Stat(filepath.Join("interop", "node_modules", "playwright-core"))
	_, browserErr := exec.LookPath(chromiumPath())
	if driverErr == nil && browserErr == nil {
		return
	}
	var missing []string
	if browserErr != nil {
		missing = append(missing, chromiumPath())
	}
	if driverErr != nil {
		missing = append(missing, "interop/node_modules/playwright-core")
	}
	msg := "status page browser unavailable: no " + strings.Join(missing, " and no ") + " (install Debian's chromium; run `npm ci` in interop/)"
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// browserPage drives interop/status-page.mjs: one browser with the status
// page open, one JSON command per line.
type browserPage struct {
	*lineDriver
	profile string // the browser's profile folder, unique to this run
}

// pageView mirrors what status-page.mjs says the page shows: the texts on
// the page, and what the driver saw of the page itself (marker, loads,
// errors).
type pageView struct {
	Marker    string `json:"marker"` // set once after the first load; a reload loses it
	Loads     int    `json:"loads"`  // load events of the page
	Polls     int    `json:"polls"`  // the page's successful refreshes
	State     string `json:"state"`  // "loading", "live" or "unreachable"
	Reach     string `json:"reach"`
	Version   string `json:"version"`
	Listening string `json:"listening"`
	Editors   string `json:"editors"`
	Upstream  struct {
		State      string `json:"state"`
		Protocol   string `json:"protocol"`
		Server     string `json:"server"`
		Since      string `json:"since"`
		Reconnects string `json:"reconnects"`
		Error      string `json:"error"`
		Close      string `json:"close"`
	} `json:"upstream"`
	Documents      map[string]map[string]string `json:"documents"` // name → field → text
	Order          []string                     `json:"order"`     // document names, top to bottom
	Graph          map[string]int               `json:"graph"`     // name → points drawn
	ConsoleErrors  []string                     `json:"consoleErrors"`
	PageErrors     []string                     `json:"pageErrors"`
	FailedRequests []string                     `json:"failedRequests"`
}

// pageAnswer mirrors one answer line of status-page.mjs.
type pageAnswer struct {
	OK      bool     `json:"ok"`
	Error   string   `json:"error"`
	Page    pageView `json:"page"`
	Profile string   `json:"profile"`
}

// openStatusPage starts the browser on the page at url and waits for its
// first refresh. At cleanup it closes the browser and fails the test if a
// process of it is left.
func openStatusPage(t *testing.T, url string) *browserPage {
	t.Helper()
	requireChromium(t)
	ctx, cancel := context.WithTimeout(context.Background(), interopTimeout)
	cmd := exec.CommandContext(ctx, "node", "status-page.mjs", "--timeout", strconv.Itoa(int(interopTimeout/time.Second)))
	// On the timeout, SIGTERM: the driver then closes the browser.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = testTimeout
	p := &browserPage{lineDriver: startLineDriver(t, cmd, 10)}
	t.Cleanup(func() { p.close(t); cancel() })
	p.do(t, map[string]any{"cmd": "open", "url": url})
	return p
}

// do sends one command and returns its answer; a failed command fails the
// test, with what the page showed last.
func (p *browserPage) do(t *testing.T, cmd map[string]any) pageAnswer {
	t.Helper()
	raw := p.exchange(t, cmd)
	var a pageAnswer
	if err := json.Unmarshal([]byte(raw), &a); err != nil {
		t.Fatalf("status-page.mjs answer %q: %v", raw, err)
	}
	if a.Profile != "" {
		p.profile = a.Profile // for close, even when the page failed
	}
	if !a.OK {
		t.Fatalf("status-page.mjs %v: %s\npage: %s\n%s", cmd, a.Error, raw, p.stderr.String())
	}
	return a
}

// waitFor waits until the page shows show (a partial pageView: objects
// match on the keys given, texts by equality) and has refreshed itself at
// least minPolls times.
func (p *browserPage) waitFor(t *testing.T, show map[string]any, minPolls int) pageView {
	t.Helper()
	cmd := map[string]any{"cmd": "waitFor", "show": show, "minPolls": minPolls, "timeoutMs": (2 * syncBound).Milliseconds()}
	return p.do(t, cmd).Page
}

// close quits the driver, which closes the browser, and fails the test
// if a browser process is still running on its profile.
func (p *browserPage) close(t *testing.T) {
	p.stdin.Close() // the driver quits at the end of its input
	if err := p.cmd.Wait(); err != nil {
		t.Errorf("status-page.mjs: %v\n%s", err, p.stderr.String())
	}
	if p.profile == "" {
		return
	}
	if left := processesWith(t, p.profile); len(left) > 0 {
		t.Errorf("browser processes left behind: %q", left)
	}
	os.RemoveAll(p.profile) // the driver's own work, unless it was killed
}

// processesWith lists the command lines of running processes that
// contain substr (none where there is no /proc).
func processesWith(t *testing.T, substr string) []string {
	t.Helper()
	cmdlines, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	var found []string
	for _, path := range cmdlines {
		b, err := os.ReadFile(path) // the process may be gone by now
		if err == nil && bytes.Contains(b, []byte(substr)) {
			found = append(found, string(bytes.ReplaceAll(b, []byte{0}, []byte{' '})))
		}
	}
	return found
}

// pageNumber is the integer a page cell shows; it fails the test on
// anything else.
func pageNumber(t *testing.T, v pageView, doc, field string) int {
	t.Helper()
	n, err := strconv.Atoi(v.Documents[doc][field])
	if err != nil {
		t.Fatalf("document %q, %s: %v", doc, field, err)
	}
	return n
}

// statusOddDoc is a document name that is markup if a page lets it be.
const statusOddDoc = `<i>plans</i> & "Grüße"`

// TestInteropStatusPage opens the status page in headless Chromium during
// a session with an ELVA server, two documents and three editors, and
// checks what it shows, that it follows the session (an editor joins,
// edits, the server goes away and comes back) without a reload, that it
// says so when the relay is gone, and that the browser logged no error
// before that.
func TestInteropStatusPage(t *testing.T) {
	requireChromium(t)
	srv := startNodeServer(t, "broadcast")
	relay := startRelayProcess(t, "--server", srv.url(), "--retry-max", "1s")
	ed := startEditors(t)
	url := "ws://" + relay.addr
	ed.join(t, "alice", url, "notes")
	ed.join(t, "bob", url, "notes")
	ed.join(t, "carol", url, statusOddDoc)
	ed.do(t, map[string]any{"cmd": "edit", "rounds": 3})
	ed.converge(t)

	page := openStatusPage(t, "http://"+relay.addr+"/")
	first := page.waitFor(t, map[string]any{
		"editors":   "3",
		"upstream":  map[string]any{"state": "connected", "protocol": "elva", "server": srv.url()},
		"documents": map[string]any{"notes": map[string]any{"editors": "2"}, statusOddDoc: map[string]any{"editors": "1"}},
	}, 1)
	if want := []string{statusOddDoc, "notes"}; !slices.Equal(first.Order, want) {
		t.Errorf("documents shown %q, want %q (by name)", first.Order, want)
	}
	if first.Version == "" || !strings.Contains(first.Listening, relay.addr) {
		t.Errorf("version %q, listening %q; want a version and %s among the addresses", first.Version, first.Listening, relay.addr)
	}
	for _, doc := range first.Order {
		if shown := first.Documents[doc]["name"]; shown != doc { // as text, not markup
			t.Errorf("document %q shows as %q", doc, shown)
		}
		if n := pageNumber(t, first, doc, "messages_in"); n == 0 {
			t.Errorf("document %q: messages in shows 0 after edits", doc)
		}
	}

	// A fourth editor joins and everyone types: the page follows.
	ed.join(t, "dave", url, statusOddDoc)
	ed.do(t, map[string]any{"cmd": "startEditing", "intervalMs": 100})
	typing := page.waitFor(t, map[string]any{
		"editors":   "4",
		"documents": map[string]any{"notes": map[string]any{"editors": "2"}, statusOddDoc: map[string]any{"editors": "2"}},
	}, first.Polls+3)
	for _, doc := range typing.Order {
		if before, now := pageNumber(t, first, doc, "messages_in"), pageNumber(t, typing, doc, "messages_in"); now <= before {
			t.Errorf("document %q: messages in went from %d to %d while editors typed", doc, before, now)
		}
		if rate := typing.Documents[doc]["rate"]; rate == "0.0" {
			t.Errorf("document %q: msg/s shows %s while editors type", doc, rate)
		}
		if typing.Graph[doc] < 2 {
			t.Errorf("document %q: the graph has %d points after %d refreshes, want a line", doc, typing.Graph[doc], typing.Polls)
		}
	}

	// The server goes away and comes back.
	srv.kill(t)
	down := page.waitFor(t, map[string]any{"upstream": map[string]any{"state": "disconnected"}}, typing.Polls+1)
	if down.Upstream.Close != "1006" { // killed: no close frame
		t.Errorf("last close code shows %q after the server was killed, want 1006", down.Upstream.Close)
	}
	srv.start(t)
	back := page.waitFor(t, map[string]any{"upstream": map[string]any{"state": "connected"}}, down.Polls+1)
	if back.Upstream.Reconnects == first.Upstream.Reconnects {
		t.Errorf("reconnects shows %s before the outage and after it", back.Upstream.Reconnects)
	}
	ed.do(t, map[string]any{"cmd": "stopEditing"})
	ed.converge(t)

	// All of that in one page load, without a message on the console.
	if back.Marker != first.Marker || back.Loads != 1 {
		t.Errorf("the page reloaded: marker %q then %q, %d loads; want it to refresh itself", first.Marker, back.Marker, back.Loads)
	}
	if len(back.ConsoleErrors)+len(back.PageErrors)+len(back.FailedRequests) > 0 {
		t.Errorf("browser errors: console %q, page %q, failed requests %q", back.ConsoleErrors, back.PageErrors, back.FailedRequests)
	}

	// The relay stops: the page says so (the browser now logs its failed
	// fetches, so no error check after this).
	relay.stop(t)
	gone := page.waitFor(t, map[string]any{"state": "unreachable"}, 0)
	if !strings.HasPrefix(gone.Reach, "relay unreachable") || gone.Marker != first.Marker {
		t.Errorf("after the relay stopped the page shows %q (marker %q, want %q), want relay unreachable", gone.Reach, gone.Marker, first.Marker)
	}
}
