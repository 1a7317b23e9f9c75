package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The interop tests drive real Yjs editors (interop/clients.mjs: yjs and
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
	cmd   *exec.Cmd
	addr  string
	lines chan string // stderr log lines
	logs  *logBuffer
	done  chan error
}

var listeningRE = regexp.MustCompile(`msg=listening addr=(\S+)`)

// startRelayProcess runs the binary with args and waits until it listens
// and its upstream is connected. At cleanup it sends SIGTERM and expects
// exit status 0 within testTimeout.
func startRelayProcess(t *testing.T, args ...string) *relayProcess {
	t.Helper()
	cmd := exec.Command(relayBinary(t), append(args, "127.0.0.1", "0")...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &relayProcess{cmd: cmd, logs: newLogBuffer(), done: make(chan error, 1)}
	go func() {
		io.Copy(p.logs, stderr)
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() { p.stop(t) })
	line := p.logs.waitFor(t, "msg=listening")
	p.addr = listeningRE.FindStringSubmatch(line)[1]
	p.logs.waitFor(t, "upstream connected")
	return p
}

// stop ends the process with SIGTERM, or kills it after testTimeout.
func (p *relayProcess) stop(t *testing.T) {
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
	if t.Failed() {
		t.Logf("relay log:\n%s", p.logs.String())
	}
	if strings.Contains(p.logs.String(), "DATA RACE") {
		t.Errorf("the relay binary reported a data race:\n%s", p.logs.String())
	}
}

// clientSpec and clientReport mirror the JSON of interop/clients.mjs.
type clientSpec struct {
	Name string `json:"name"`
	URL  string `json:"url"`
	Doc  string `json:"doc"`
}

type clientReport struct {
	Name      string   `json:"name"`
	Doc       string   `json:"doc"`
	Text      string   `json:"text"`
	Awareness []string `json:"awareness"`
}

type interopReport struct {
	TimedOut bool           `json:"timedOut"`
	Clients  []clientReport `json:"clients"`
}

// runClients runs the Node editors and returns their report.
func runClients(t *testing.T, clients []clientSpec, edits int) interopReport {
	t.Helper()
	spec, _ := json.Marshal(map[string]any{"clients": clients, "edits": edits, "timeoutMs": 30000})
	ctx, cancel := context.WithTimeout(context.Background(), interopTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", "clients.mjs", string(spec))
	cmd.Dir = "interop"
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	runErr := cmd.Run()
	var report interopReport
	if err := json.Unmarshal(stdout.Bytes(), &report); err != nil {
		t.Fatalf("node clients: %v, no report (%v)\nstdout: %s\nstderr: %s", runErr, err, stdout.String(), stderr.String())
	}
	if runErr != nil || report.TimedOut {
		t.Errorf("node clients did not finish (%v); report: %+v\nstderr: %s", runErr, report, stderr.String())
	}
	return report
}

// tokens lists the edits a client made, as clients.mjs writes them.
func tokens(name string, edits int) []string {
	var out []string
	for i := range edits {
		out = append(out, "["+name+":"+strconv.Itoa(i)+"]")
	}
	return out
}

// checkConvergence asserts that the editors of each document hold the same
// text with every edit of that document exactly once and none of another,
// and that each sees the awareness of exactly its document's editors.
func checkConvergence(t *testing.T, clients []clientSpec, report interopReport, edits int) {
	t.Helper()
	names := map[string][]string{} // doc → editor names
	for _, c := range clients {
		names[c.Doc] = append(names[c.Doc], c.Name)
	}
	texts := map[string]string{} // doc → first text seen
	for _, got := range report.Clients {
		if first, ok := texts[got.Doc]; ok && first != got.Text {
			t.Errorf("%s on %q has %q, another editor has %q", got.Name, got.Doc, got.Text, first)
		}
		texts[got.Doc] = got.Text
		for _, c := range clients {
			for _, tok := range tokens(c.Name, edits) {
				want := 0
				if c.Doc == got.Doc {
					want = 1
				}
				if n := strings.Count(got.Text, tok); n != want {
					t.Errorf("%s on %q has %s %d times, want %d (text %q)", got.Name, got.Doc, tok, n, want, got.Text)
				}
			}
		}
		want := slices.Sorted(slices.Values(names[got.Doc]))
		if !slices.Equal(got.Awareness, want) {
			t.Errorf("%s on %q sees awareness of %v, want %v", got.Name, got.Doc, got.Awareness, want)
		}
	}
}

func TestInteropThreeEditorsTwoDocuments(t *testing.T) {
	requireNode(t)
	srv := newELVAServer(t, magicSeed)
	relay := startRelayProcess(t, "--server", srv.url())
	url := "ws://" + relay.addr
	const edits = 5
	clients := []clientSpec{
		{"alice", url, "notes"},
		{"bob", url, "notes"},
		{"carol", url, "notes"},
		{"dave", url, "Grüße"},
	}
	report := runClients(t, clients, edits)
	if len(report.Clients) != len(clients) {
		t.Fatalf("report has %d clients, want %d", len(report.Clients), len(clients))
	}
	checkConvergence(t, clients, report, edits)
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
