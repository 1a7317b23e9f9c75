// Command elva-service relays Yjs messages between local editors and a
// remote ELVA server.
//
// Local editors connect to ws://HOST:PORT/<document> with any Yjs client.
// Each local conn has a reader and a writer goroutine. Readers send frames
// to the hub; the hub alone owns document → conns and copies each frame to
// the other conns' send queues and to the upstream queue. The upstream
// writer prefixes every frame with its document's ID and sends it over the
// one connection to the server; the upstream reader strips the prefix of
// what comes back and hands it to the hub, which passes it to every local
// editor of that document. No queue is unbounded and the hub never blocks:
// a conn that cannot keep up is closed, and its client resyncs on reconnect.
package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	_ "embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/net/netutil"
	"golang.org/x/net/websocket"
)

const (
	// defaultMaxMessage bounds one message from an editor (--max-message).
	defaultMaxMessage = 32 << 20
	// stopTimeout bounds the wait for queued frames and open conns at stop.
	stopTimeout = 5 * time.Second
	// defaultPingInterval is how often every peer is pinged (--ping-interval).
	defaultPingInterval = 10 * time.Second
	// defaultPeerTimeout is how long a peer may stay silent (--peer-timeout);
	// y-websocket clients give up on a silent server after 30 s too.
	defaultPeerTimeout = 30 * time.Second
	// defaultMaxConns bounds the local connections (--max-connections).
	defaultMaxConns = 1024
	// defaultUpstreamMax is the largest frame the upstream server takes
	// (--upstream-max-message): 1 MiB, the default message limit of Python
	// websockets, which the original ELVA server runs on.
	defaultUpstreamMax = "1MiB"
	// defaultMaxPerDoc bounds the local connections to one document
	// (--max-per-document).
	defaultMaxPerDoc = 256
)

// handshakeTimeout bounds how long a local client may take to send its
// request headers, and an idle keep-alive connection may wait, so that a
// slow or silent socket cannot hold a goroutine (slow-loris). A variable
// for one test only.
var handshakeTimeout = 10 * time.Second

// maxHeaderBytes bounds a local request's headers; a Yjs client sends a
// few hundred bytes.
const maxHeaderBytes = 16 << 10

// The upstream protocols (--protocol).
const (
	protocolELVA = "elva" // one connection, ID prefixes (PROTOCOL.md §2)
	protocolYjs  = "yjs"  // one connection per document (PROTOCOL.md §3)
	// protocolHocuspocus: one connection, document names, auth per document (PROTOCOL.md §4)
	protocolHocuspocus = "hocuspocus"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

// errVersion asks run to print the version and exit 0.
var errVersion = errors.New("version requested")

const usage = `elva-service relays Yjs documents between local editors, keeps them on this
machine, and carries them to a remote server (ELVA, a Yjs server, Hocuspocus) if given one.

Usage:
  elva-service [flags] [HOST] [PORT]

Local editors connect to ws://HOST:PORT/<document> with any Yjs client
(y-websocket's WebsocketProvider, ELVA apps). HOST defaults to localhost,
PORT to 8000 (0 picks a free port, which is logged). Flags and HOST PORT
may come in any order.

Flags:
  --server URI        the remote server, ws:// or wss:// (env ELVA_SERVER);
                      without one the relay is a local Yjs server
  --data-dir DIR      where documents are kept (env ELVA_DATA_DIR; default
                      $XDG_DATA_HOME/elva-service or ~/.local/share/elva-service,
                      on macOS ~/Library/Application Support/elva-service)
  --no-store          keep nothing on disk: edits live only in the editors
                      and the server
  --fsync-interval D  longest time an update waits before it is on disk
                      (default 100ms; 0: fsync after every update)
  --list-docs         list the stored documents and exit
  --remove-doc NAME   remove one stored document and exit (stop the relay first)
  --user NAME         user name for HTTP Basic auth (env ELVA_USER)
  --password PASS     password; visible to other users in the process
                      list, prefer --password-file or ELVA_PASSWORD
  --password-file F   read the password from the first line of F, which
                      only its owner may read (chmod 600)
  --allow-insecure-auth  send credentials over ws:// to another machine
  --ca-file PEM       trust this CA for a wss:// server, besides the system's
  --allow-origin O    let pages from origin O (e.g. https://notes.example.org)
                      connect; repeatable; '*' lets every page in (unsafe).
                      Loopback pages and clients without Origin always may.
  --max-connections N      local connections in all (default 1024)
  --max-per-document N     local connections per document (default 256)
  --protocol P        the server's protocol (env ELVA_PROTOCOL): elva (default;
                      one connection, ID prefixes: the seed's ELVA server),
                      yjs (one connection per document at SERVER/<document>:
                      ELVA since mid-2025, @y/websocket-server, y-sweet,
                      pycrdt-websocket) or hocuspocus (one connection,
                      @hocuspocus/server, also behind Redis)
  --token T           hocuspocus: the token each document is authenticated
                      with (env ELVA_TOKEN; prefer --token-file)
  --token-file F      hocuspocus: the token is F's first line (chmod 600)
  --upstream-grace D  yjs, hocuspocus: keep a document open upstream this long
                      after its last local editor left (default 30s)
  --id-magic HEX      ID message type on the upstream: 0200 (default, the
                      documented protocol) or 4944 (ELVA server, mid-2025)
  --max-message SIZE  largest message accepted, e.g. 32MiB (default), 512KiB
  --upstream-max-message SIZE  largest frame the server takes, ID prefix
                      included (default 1MiB; env ELVA_UPSTREAM_MAX_MESSAGE)
  --ping-interval D   ping every peer this often (default 10s, 0: never,
                      which turns --peer-timeout off too unless it is given)
  --peer-timeout D    close a peer silent for this long, which finds
                      half-open connections (default 30s, 0: never)
  --retry-max D       longest wait between upstream reconnect attempts
                      (default 30s; the waits start at 0.5s and double)
  --log FILE          append logs to FILE instead of stderr
  -v, --verbose       log every message (debug level)
  --version           print the version and exit
  -h, --help          print this help and exit

Examples:
  elva-service
  elva-service --server wss://elva.example.org/
  ELVA_USER=ada ELVA_PASSWORD=secret elva-service --server wss://elva.example.org/ localhost 8000
  elva-service 127.0.0.1 9000 --server ws://127.0.0.1:8765/ --id-magic 4944 -v

Exit status: 0 after a stop by signal, 1 on a runtime failure (listening,
the log file, upstream credentials refused), 2 on bad flags or arguments,
128+n after a second signal n.
`

// config is the parsed command line and environment.
type config struct {
	host       string
	port       int
	server     *url.URL // without userinfo
	user       string
	password   string
	magic      idMagic
	maxMessage int
	// protocol is the upstream's (--protocol): protocolELVA, protocolYjs
	// or protocolHocuspocus.
	protocol string
	// token authenticates each document with a Hocuspocus server (--token,
	// --token-file, ELVA_TOKEN); never logged.
	token string
	// upstreamGrace is how long a document's own upstream connection stays
	// open after its last local editor left (yjs mode).
	upstreamGrace time.Duration
	// upstreamMaxMessage is the largest frame the server takes, in bytes,
	// ID prefix included (--upstream-max-message).
	upstreamMaxMessage int
	logFile            string
	verbose            bool
	// dataDir is where the store keeps documents (--data-dir); noStore
	// turns it off; fsyncInterval is the longest an update waits before
	// it is on disk (0: fsync after every one).
	dataDir       string
	noStore       bool
	fsyncInterval time.Duration
	// listDocs and removeDoc are the store's command-line tools: list the
	// stored documents, remove one; the relay does not start.
	listDocs  bool
	removeDoc string
	keepalive keepalive
	retryMax  time.Duration
	tls       *tls.Config // nil: the system's roots
	gate      gate
	limits    limits
	// warnings are logged once the logger exists.
	warnings []string
}

// main runs the relay until the first SIGINT or SIGTERM has stopped it.
func main() {
	ctx, cancel := context.WithCancel(context.Background())
	// One channel takes both signals, so a second one that comes quickly
	// is never lost to a handler that is still being replaced.
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
	stop := &signalStop{signals: signals, cancel: cancel, now: time.Now, exit: os.Exit, stderr: os.Stderr}
	go stop.run()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv))
}

// signalWindow is how soon after the first signal a second one is the
// same stop delivered twice: coreutils timeout(1) signals the relay and
// then its process group, and systemd's default KillMode=control-group
// signals every process of the unit, so the relay gets two at once. A
// person who presses Ctrl-C again is slower than this.
const signalWindow = 250 * time.Millisecond

// signalStop starts a graceful stop at the first signal and exits at once,
// with 128 + the signal's number as the shell does, at a second one that
// comes signalWindow or later after it. Static after construction.
type signalStop struct {
	signals <-chan os.Signal
	cancel  context.CancelFunc // starts the graceful stop
	now     func() time.Time   // called once per signal
	exit    func(code int)
	stderr  io.Writer
	log     *slog.Logger // nil: slog.Default(), which run sets
}

// run is the signal goroutine. It returns after calling exit, or when
// signals is closed (in tests; main never closes it).
func (s *signalStop) run() {
	if _, ok := <-s.signals; !ok {
		return
	}
	first := s.now()
	s.cancel()
	for sig := range s.signals {
		if s.now().Sub(first) < signalWindow {
			s.logger().Debug("signal ignored: the stop has begun just now", "signal", sig.String())
			continue
		}
		fmt.Fprintf(s.stderr, "elva-service: second %v: exiting at once\n", sig)
		code := 1
		if n, ok := sig.(syscall.Signal); ok {
			code = 128 + int(n)
		}
		s.exit(code)
		return
	}
}

// logger is s.log, or the default logger.
func (s *signalStop) logger() *slog.Logger {
	if s.log != nil {
		return s.log
	}
	return slog.Default()
}

// run is main without the process around it, for tests: it returns the
// exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	cfg, err := parseArgs(args, getenv)
	switch {
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprint(stdout, usage)
		return 0
	case errors.Is(err, errVersion):
		fmt.Fprintln(stdout, "elva-service", buildVersion())
		return 0
	case err != nil:
		fmt.Fprintf(stderr, "elva-service: %v (see --help)\n", err)
		return 2
	}
	if cfg.listDocs || cfg.removeDoc != "" {
		return storeTool(cfg, stdout, stderr)
	}
	log, closeLog, err := newLogger(cfg, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "elva-service: %v\n", err)
		return 1
	}
	defer closeLog()
	slog.SetDefault(log) // for the signal goroutine, started before log
	s, err := listen(cfg, log)
	if err != nil {
		log.Error("cannot listen", "err", err)
		return 1
	}
	return s.run(ctx)
}

// storeTool lists the stored documents (--list-docs) or removes one
// (--remove-doc) and returns the exit status: 0, or 1 when the store
// cannot be read or the document is not there.
func storeTool(cfg *config, stdout, stderr io.Writer) int {
	dir := cfg.storeDir()
	if cfg.removeDoc != "" {
		if err := removeStored(dir, cfg.removeDoc); err != nil {
			fmt.Fprintf(stderr, "elva-service: %v\n", err)
			return 1
		}
		fmt.Fprintf(stdout, "removed %q from %s\n", cfg.removeDoc, dir)
		return 0
	}
	list, err := listStored(dir)
	if err != nil {
		fmt.Fprintf(stderr, "elva-service: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "%d documents in %s\n", len(list), dir)
	for _, d := range list {
		switch {
		case d.err != nil:
			fmt.Fprintf(stdout, "%10d  %-5s  %s (unreadable: %v)\n", d.bytes, "", d.name, d.err)
		case d.owed:
			fmt.Fprintf(stdout, "%10d  %-5s  %q\n", d.bytes, "owed", d.name)
		default:
			fmt.Fprintf(stdout, "%10d  %-5s  %q\n", d.bytes, "", d.name)
		}
	}
	return 0
}

// storeDir is where the store keeps the documents of c's server: a
// directory of the data directory per server (protocol and URI, without
// credentials, query or fragment), "local" without one. A document name
// is unique on one server only: the relay must never answer an editor of
// one server with another server's "notes", nor send them there.
func (c *config) storeDir() string {
	if c.server == nil {
		return filepath.Join(c.dataDir, "local")
	}
	u := *c.server
	u.User, u.RawQuery, u.Fragment = nil, "", ""
	return filepath.Join(c.dataDir, strings.TrimSuffix(docFileName(c.protocol+" "+u.String()), docFileExt))
}

// flagValues holds what the flags set, before it is checked.
type flagValues struct {
	server, user, password, passwordFile, caFile, logFile *string
	magic, maxMessage, upstreamMax, protocol              *string
	token, tokenFile                                      *string
	dataDir, removeDoc                                    *string
	fsyncInterval                                         *time.Duration
	noStore, listDocs                                     bool
	pingInterval, peerTimeout, retryMax, upstreamGrace    *time.Duration
	maxConns, maxPerDoc                                   *int
	origins                                               originList
	verbose, showVersion, insecureAuth                    bool
}

// defineFlags defines every flag on fs, with the ELVA_* environment
// variables as the defaults of those that have one.
func defineFlags(fs *flag.FlagSet, getenv func(string) string) *flagValues {
	v := &flagValues{
		server:        fs.String("server", getenv("ELVA_SERVER"), ""),
		user:          fs.String("user", getenv("ELVA_USER"), ""),
		password:      fs.String("password", getenv("ELVA_PASSWORD"), ""),
		passwordFile:  fs.String("password-file", "", ""),
		caFile:        fs.String("ca-file", "", ""),
		logFile:       fs.String("log", "", ""),
		magic:         fs.String("id-magic", magicSeed.String(), ""),
		protocol:      fs.String("protocol", cmp.Or(getenv("ELVA_PROTOCOL"), protocolELVA), ""),
		token:         fs.String("token", getenv("ELVA_TOKEN"), ""),
		tokenFile:     fs.String("token-file", "", ""),
		maxMessage:    fs.String("max-message", "32MiB", ""),
		upstreamMax:   fs.String("upstream-max-message", cmp.Or(getenv("ELVA_UPSTREAM_MAX_MESSAGE"), defaultUpstreamMax), ""),
		pingInterval:  durationFlag(fs, "ping-interval", defaultPingInterval),
		peerTimeout:   durationFlag(fs, "peer-timeout", defaultPeerTimeout),
		retryMax:      durationFlag(fs, "retry-max", defaultRetryMax),
		upstreamGrace: durationFlag(fs, "upstream-grace", defaultUpstreamGrace),
		maxConns:      intFlag(fs, "max-connections", defaultMaxConns),
		maxPerDoc:     intFlag(fs, "max-per-document", defaultMaxPerDoc),
		dataDir:       fs.String("data-dir", getenv("ELVA_DATA_DIR"), ""),
		removeDoc:     fs.String("remove-doc", "", ""),
		fsyncInterval: durationFlag(fs, "fsync-interval", defaultFsyncInterval),
	}
	fs.BoolVar(&v.noStore, "no-store", false, "")
	fs.BoolVar(&v.listDocs, "list-docs", false, "")
	fs.Var(&v.origins, "allow-origin", "")
	fs.BoolVar(&v.verbose, "v", false, "")
	fs.BoolVar(&v.verbose, "verbose", false, "")
	fs.BoolVar(&v.showVersion, "version", false, "")
	fs.BoolVar(&v.insecureAuth, "allow-insecure-auth", false, "")
	return v
}

// parseArgs reads flags, the positional HOST and PORT in any order, and the
// ELVA_* environment variables, which flags override.
func parseArgs(args []string, getenv func(string) string) (*config, error) {
	fs := flag.NewFlagSet("elva-service", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	v := defineFlags(fs, getenv)
	positional, err := parseInterleaved(fs, args)
	if err != nil {
		return nil, err
	}
	if v.showVersion {
		return nil, errVersion
	}
	cfg := &config{host: "localhost", port: 8000, logFile: *v.logFile, verbose: v.verbose, user: *v.user, password: *v.password}
	if err := cfg.setAddress(positional); err != nil {
		return nil, err
	}
	if err := cfg.setTuning(fs, v); err != nil {
		return nil, err
	}
	if flagSet(fs, "password") {
		cfg.warnings = append(cfg.warnings, "--password is visible to other users in the process list; use --password-file or ELVA_PASSWORD")
	}
	if *v.passwordFile != "" && !flagSet(fs, "password") {
		if cfg.password, err = readSecretFile("--password-file", *v.passwordFile); err != nil {
			return nil, err
		}
	}
	if cfg.token = *v.token; *v.tokenFile != "" && !flagSet(fs, "token") {
		if cfg.token, err = readSecretFile("--token-file", *v.tokenFile); err != nil {
			return nil, err
		}
	}
	if flagSet(fs, "token") {
		cfg.warnings = append(cfg.warnings, "--token is visible to other users in the process list; use --token-file or ELVA_TOKEN")
	}
	cfg.warnings = append(cfg.warnings, otherModesFlags(fs, cfg.protocol)...)
	if err := cfg.setServer(*v.server); err != nil {
		return nil, err
	}
	if err := cfg.checkAuthTransport(v.insecureAuth); err != nil {
		return nil, err
	}
	if *v.caFile != "" {
		if cfg.tls, err = loadCAFile(*v.caFile); err != nil {
			return nil, err
		}
	}
	cfg.setGate(v.origins)
	if err := cfg.setStore(v, getenv); err != nil {
		return nil, err
	}
	return cfg, nil
}

// setStore takes the store's flags: the data directory (--data-dir, or the
// platform's default), --no-store, --fsync-interval and the tools.
func (c *config) setStore(v *flagValues, getenv func(string) string) error {
	c.noStore, c.fsyncInterval = v.noStore, *v.fsyncInterval
	c.listDocs, c.removeDoc = v.listDocs, *v.removeDoc
	if c.fsyncInterval < 0 {
		return fmt.Errorf("--fsync-interval %v: want 0 (after every update) or more", c.fsyncInterval)
	}
	if c.noStore && (c.listDocs || c.removeDoc != "") {
		return errors.New("--no-store with --list-docs or --remove-doc: there is no store to look at")
	}
	c.dataDir = *v.dataDir
	if c.dataDir == "" && !c.noStore {
		dir, err := defaultDataDir(getenv)
		if err != nil && (c.listDocs || c.removeDoc != "") {
			return err
		}
		if err != nil {
			// Never refuse to start over the store: relay without one.
			c.noStore = true
			c.warnings = append(c.warnings, fmt.Sprintf("documents are not kept: %v", err))
		}
		c.dataDir = dir
	}
	return nil
}

// setTuning checks and takes the ID magic, the sizes, the keepalive, the
// retry bound and the connection limits.
func (c *config) setTuning(fs *flag.FlagSet, v *flagValues) error {
	var err error
	if c.magic, err = parseIDMagic(*v.magic); err != nil {
		return fmt.Errorf("--id-magic: %w", err)
	}
	switch *v.protocol {
	case protocolELVA, protocolYjs, protocolHocuspocus:
		c.protocol = *v.protocol
	default:
		return fmt.Errorf("--protocol (or ELVA_PROTOCOL) %q: want elva (one connection, ID prefixes), yjs (one connection per document) or hocuspocus", *v.protocol)
	}
	if *v.upstreamGrace < 0 {
		return errors.New("--upstream-grace must not be negative")
	}
	c.upstreamGrace = *v.upstreamGrace
	if c.maxMessage, err = parseSize(*v.maxMessage); err != nil {
		return fmt.Errorf("--max-message: %w", err)
	}
	if c.upstreamMaxMessage, err = parseSize(*v.upstreamMax); err != nil {
		return fmt.Errorf("--upstream-max-message (or ELVA_UPSTREAM_MAX_MESSAGE): %w", err)
	}
	peerTimeout := *v.peerTimeout
	if *v.pingInterval == 0 && !flagSet(fs, "peer-timeout") {
		peerTimeout = 0 // without pings a quiet peer is not a dead one
	}
	if err := c.setKeepalive(*v.pingInterval, peerTimeout); err != nil {
		return err
	}
	if *v.retryMax < backoffBase {
		return fmt.Errorf("--retry-max %v: want at least %v", *v.retryMax, backoffBase)
	}
	c.retryMax = *v.retryMax
	if *v.maxConns < 1 || *v.maxPerDoc < 1 {
		return errors.New("--max-connections and --max-per-document must be at least 1")
	}
	c.limits = limits{conns: *v.maxConns, perDoc: *v.maxPerDoc}
	return nil
}

// checkedValue is a flag value whose error says what is wanted: the flag
// package's own says only "parse error".
type checkedValue[T any] struct {
	v     *T
	parse func(string) (T, error)
	want  string // the error for a value parse refuses
}

// checkedFlag defines a flag of type T on fs, parsed by parse, and
// returns where it is kept.
func checkedFlag[T any](fs *flag.FlagSet, name string, def T, parse func(string) (T, error), want string) *T {
	v := def
	fs.Var(checkedValue[T]{&v, parse, want}, name, "")
	return &v
}

// durationFlag defines a duration flag (10s, 1m30s; a bare number is an
// error).
func durationFlag(fs *flag.FlagSet, name string, def time.Duration) *time.Duration {
	return checkedFlag(fs, name, def, time.ParseDuration, "use a unit, e.g. 10s")
}

// intFlag defines a flag that takes a decimal whole number.
func intFlag(fs *flag.FlagSet, name string, def int) *int {
	return checkedFlag(fs, name, def, strconv.Atoi, "want a whole number, e.g. 100")
}

// String is the value as fmt prints it.
func (c checkedValue[T]) String() string {
	if c.v == nil {
		return ""
	}
	return fmt.Sprint(*c.v)
}

// Set parses s, or answers with what is wanted.
func (c checkedValue[T]) Set(s string) error {
	v, err := c.parse(s)
	if err != nil {
		return errors.New(c.want)
	}
	*c.v = v
	return nil
}

// otherModesFlags warns of flags given for another protocol than the one
// running: they do nothing, which the user should know.
func otherModesFlags(fs *flag.FlagSet, protocol string) []string {
	var warnings []string
	for _, f := range []struct{ name, mode string }{
		{"token", protocolHocuspocus}, {"token-file", protocolHocuspocus},
		{"id-magic", protocolELVA},
	} {
		if flagSet(fs, f.name) && protocol != f.mode {
			warnings = append(warnings, fmt.Sprintf("--%s is for --protocol %s; it does nothing with --protocol %s", f.name, f.mode, protocol))
		}
	}
	return warnings
}

// flagSet reports whether the command line set the flag name.
func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// originList collects the repeatable --allow-origin.
type originList []string

// String lists the origins, comma-separated.
func (o *originList) String() string { return strings.Join(*o, ",") }

// Set adds one origin, normalised, or '*'.
func (o *originList) Set(v string) error {
	if v != "*" {
		norm, ok := normalOrigin(v)
		if !ok {
			return fmt.Errorf("origin %q: want scheme://host[:port], e.g. https://notes.example.org, or *", v)
		}
		v = norm
	}
	*o = append(*o, v)
	return nil
}

// normalOrigin gives an origin in the form browsers send: scheme and host
// in lower case, no default port, no path. ok is false for anything else
// than an http or https origin.
func normalOrigin(origin string) (string, bool) {
	u, err := url.Parse(origin)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
		(u.Path != "" && u.Path != "/") || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return "", false
	}
	scheme, host, port := strings.ToLower(u.Scheme), strings.ToLower(u.Hostname()), u.Port()
	if (scheme == "http" && port == "80") || (scheme == "https" && port == "443") {
		port = ""
	}
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	if port != "" {
		host += ":" + port
	}
	return scheme + "://" + host, true
}

// setGate builds the admission rules for local requests.
func (c *config) setGate(origins originList) {
	c.gate = gate{host: c.host, origins: make(map[string]bool)}
	if ip := net.ParseIP(c.host); ip != nil && ip.IsUnspecified() {
		c.gate.anyIP = true
	}
	for _, o := range origins {
		if o == "*" {
			c.gate.anyOrigin = true
			c.warnings = append(c.warnings, "--allow-origin '*': every web page open in a browser on this machine can read and change your documents")
			continue
		}
		c.gate.origins[o] = true
	}
	if !isLoopbackName(strings.ToLower(c.host)) {
		c.warnings = append(c.warnings, "listening on a non-loopback address: everyone who can reach "+
			net.JoinHostPort(c.host, strconv.Itoa(c.port))+" over the network can read and change your documents")
	}
}

// readSecretFile returns the first line of path, the file given to
// flagName (--password-file, --token-file). A file that users
// other than its owner may read is refused, as ssh refuses such keys.
func readSecretFile(flagName, path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", flagName, err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("%s: %w", flagName, err)
	}
	if perm := info.Mode().Perm(); perm&0o077 != 0 {
		return "", fmt.Errorf("%s %s: mode %#o lets others read it; chmod 600 it", flagName, path, perm)
	}
	line, err := bufio.NewReader(io.LimitReader(f, 4096)).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("%s: %w", flagName, err)
	}
	line = strings.TrimRight(line, "\r\n")
	if line == "" {
		return "", fmt.Errorf("%s %s: the first line is empty", flagName, path)
	}
	return line, nil
}

// checkAuthTransport refuses to send Basic credentials in clear text over
// the network: ws:// is fine only to this machine.
func (c *config) checkAuthTransport(allowInsecure bool) error {
	if c.user == "" || c.server == nil || c.server.Scheme != "ws" || allowInsecure || isLoopbackName(strings.ToLower(c.server.Hostname())) {
		return nil
	}
	return fmt.Errorf("refusing to send credentials in clear text to %s: use wss:// or --allow-insecure-auth", c.server.Host)
}

// loadCAFile trusts the certificates in a PEM file besides the system's.
func loadCAFile(path string) (*tls.Config, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--ca-file: %w", err)
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--ca-file %s: no PEM certificate in it", path)
	}
	return &tls.Config{RootCAs: pool}, nil
}

// parseInterleaved parses flags that may stand before, between and after
// the positional arguments, as the original's click parser allows. After
// "--" everything is positional.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, doubleDash(err)
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return positional, nil
		}
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(positional, rest...), nil
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
}

// doubleDash writes the flag package's "-name" as "--name", the form the
// help uses; flag.ErrHelp stays as it is.
func doubleDash(err error) error {
	if errors.Is(err, flag.ErrHelp) {
		return err
	}
	r := strings.NewReplacer("flag -", "flag --", "defined: -", "defined: --", "argument: -", "argument: --")
	return errors.New(r.Replace(err.Error()))
}

// setAddress takes the optional positional HOST and PORT.
func (c *config) setAddress(positional []string) error {
	switch len(positional) {
	case 2:
		port, err := strconv.Atoi(positional[1])
		if err != nil || port < 0 || port > 65535 {
			return fmt.Errorf("port %q: want a number from 0 to 65535", redactArg(positional[1]))
		}
		c.port = port
		fallthrough
	case 1:
		if isDigits(positional[0]) {
			return fmt.Errorf("%q looks like a port: give HOST PORT, e.g. localhost %s", positional[0], positional[0])
		}
		host, err := checkHost(positional[0])
		if err != nil {
			return err
		}
		c.host = host
	case 0:
	default:
		shown := make([]string, len(positional))
		for i, arg := range positional {
			shown[i] = redactArg(arg)
		}
		return fmt.Errorf("too many arguments: %q (want at most HOST PORT)", shown)
	}
	return nil
}

// checkHost returns HOST without IPv6 brackets if it is an IP literal,
// localhost or a valid DNS host name (RFC 1123), so that nothing else is
// ever looked up or logged. The error does not quote an argument with an
// '@' or a ':' in it: it may hold credentials.
func checkHost(host string) (string, error) {
	switch {
	case host == "":
		return "", errors.New("host is empty")
	case strings.Contains(host, "@"):
		return "", errors.New("HOST looks like credentials or a URI (it has an '@'): use --server for the server URI and its credentials")
	case strings.Contains(host, "/"):
		return "", fmt.Errorf("host %q: want a name or an address (is it the server? use --server)", host)
	case strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]"):
		inner := host[1 : len(host)-1]
		if ip, err := netip.ParseAddr(inner); err == nil && ip.Is6() {
			return inner, nil
		}
		return "", errors.New("host in brackets is not an IPv6 address, nor a host name")
	}
	if _, err := netip.ParseAddr(host); err == nil || strings.EqualFold(host, "localhost") {
		return host, nil
	}
	if isDigits(host) {
		return "", fmt.Errorf("host %q looks like a port: give HOST PORT, e.g. localhost 9000", host)
	}
	if strings.Contains(host, ":") {
		return "", errors.New("host is not an IP address, nor a host name: give HOST and PORT as two arguments, e.g. localhost 9000")
	}
	if !isHostName(host) {
		return "", fmt.Errorf("host %q is not a host name: want an IP address, localhost or a name of letters, digits, '-' and '.'", host)
	}
	return host, nil
}

// isDigits reports whether s is a non-empty string of ASCII digits.
func isDigits(s string) bool {
	return s != "" && strings.Trim(s, "0123456789") == ""
}

// isHostName reports whether name is a DNS host name as RFC 1123 has it:
// dot-separated labels of 1 to 63 letters, digits and inner hyphens, at
// most 253 bytes, with an optional final dot.
func isHostName(name string) bool {
	name = strings.TrimSuffix(name, ".")
	if name == "" || len(name) > 253 {
		return false
	}
	for _, label := range strings.Split(name, ".") {
		if len(label) < 1 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			b := label[i]
			if !('a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9' || b == '-') {
				return false
			}
		}
	}
	return true
}

// redactArg hides the password of a URI given where HOST or PORT belong:
// the error message quotes the argument.
func redactArg(arg string) string {
	if u, err := url.Parse(arg); err == nil && u.User != nil {
		return u.Redacted()
	}
	if i := strings.LastIndex(arg, "@"); i >= 0 {
		return "…" + arg[i:] // unparsable, but it may hold userinfo
	}
	return arg
}

// setKeepalive checks the ping interval against the peer timeout: a peer
// needs a few pings' time to answer before it counts as dead.
func (c *config) setKeepalive(interval, timeout time.Duration) error {
	switch {
	case interval < 0 || timeout < 0:
		return errors.New("--ping-interval and --peer-timeout must not be negative")
	case timeout > 0 && interval == 0:
		return fmt.Errorf("--peer-timeout %v needs pings: set --ping-interval too, or --peer-timeout 0", timeout)
	case timeout > 0 && timeout < 2*interval:
		return fmt.Errorf("--peer-timeout %v must be at least twice --ping-interval %v", timeout, interval)
	}
	c.keepalive = keepalive{interval: interval, timeout: timeout}
	return nil
}

// setServer checks the upstream URI; without one (raw empty) the relay is
// standalone and c.server stays nil. Credentials in its userinfo are moved
// out of it so that the URI can be logged; --user and --password win.
func (c *config) setServer(raw string) error {
	if raw == "" {
		return nil // standalone: a local Yjs server over the store
	}
	if !strings.Contains(raw, "://") {
		return fmt.Errorf("--server %s: want ws://HOST:PORT/ or wss://HOST/", redactArg(raw))
	}
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("--server: %w", redactURLError(err))
	}
	if u.Scheme != "ws" && u.Scheme != "wss" {
		return fmt.Errorf("--server %s: scheme must be ws or wss", u.Redacted())
	}
	if u.Hostname() == "" {
		return fmt.Errorf("--server %s: no host", u.Redacted())
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("--server %s: bad port %q", u.Redacted(), p)
		}
	}
	if u.User != nil {
		if c.user == "" {
			c.user = u.User.Username()
		}
		if pw, ok := u.User.Password(); ok && c.password == "" {
			c.password = pw
		}
		u.User = nil
	}
	if u.Path == "" {
		u.Path = "/"
	}
	if sameAddress(u, c.host, c.port) {
		return fmt.Errorf("remote server address %s is identical to the service address ws://%s", u, net.JoinHostPort(c.host, strconv.Itoa(c.port)))
	}
	c.server = u
	return nil
}

// redactURLError drops the URI from a url.Parse error: it may hold a password.
func redactURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// sameAddress reports whether the server URI points at the relay itself,
// which would loop every message back into the relay.
func sameAddress(u *url.URL, host string, port int) bool {
	if hostPort(u) == net.JoinHostPort(u.Hostname(), strconv.Itoa(port)) {
		h := strings.ToLower(u.Hostname())
		host = strings.ToLower(host)
		return h == host || (isLoopbackName(h) && isLoopbackName(host))
	}
	return false
}

// isLoopbackName reports whether host names this machine's loopback.
func isLoopbackName(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// minMessageLimit is the smallest message limit taken: a Yjs client's
// first messages (its step 1, its awareness) take a few hundred bytes, so
// a smaller limit would close every editor at once.
const minMessageLimit = 1 << 10

// parseSize reads a byte count with an optional KiB or MiB suffix.
func parseSize(s string) (int, error) {
	unit := 1
	num := s
	for _, suffix := range []struct {
		name string
		mult int
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"K", 1 << 10}, {"M", 1 << 20}, {"B", 1}} {
		if strings.HasSuffix(s, suffix.name) {
			num, unit = strings.TrimSuffix(s, suffix.name), suffix.mult
			break
		}
	}
	n, err := strconv.Atoi(num)
	if err != nil || n < 1 || n > (1<<30)/unit || n*unit < minMessageLimit {
		return 0, fmt.Errorf("size %q: want 1KiB to 1024MiB, e.g. 32MiB (a bare number is bytes)", s)
	}
	return n * unit, nil
}

// newLogger writes text logs to the --log file, or to stderr.
func newLogger(cfg *config, stderr io.Writer) (*slog.Logger, func(), error) {
	level := slog.LevelInfo
	if cfg.verbose {
		level = slog.LevelDebug
	}
	w, closeLog := stderr, func() {}
	if cfg.logFile != "" {
		f, err := os.OpenFile(cfg.logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return nil, nil, fmt.Errorf("--log: %w", err)
		}
		w, closeLog = f, func() { f.Close() }
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})), closeLog, nil
}

// buildVersion is the relay's version: -ldflags "-X main.version=…" if
// given, else the module version the Go toolchain recorded (a tag, or a
// pseudo-version from the VCS; "(devel)" counts as none), then the VCS
// revision, "+dirty" when the tree had changes.
func buildVersion() string {
	v := version
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	if mv := info.Main.Version; v == "dev" && mv != "" && mv != "(devel)" {
		v = mv
	}
	var rev, dirty string
	for _, s := range info.Settings {
		switch {
		case s.Key == "vcs.revision" && len(s.Value) >= 12:
			rev = s.Value[:12]
		case s.Key == "vcs.modified" && s.Value == "true":
			dirty = "+dirty"
		}
	}
	if rev != "" && !strings.Contains(v, rev) { // a pseudo-version names it already
		v += " (" + rev + dirty + ")"
	}
	return v
}

// dropReason names why the relay dropped a message or a request, or closed
// an editor. Each reason has its own counter (for the metrics) and its own
// log budget, so that a flood of one reason never hides the first line of
// another.
type dropReason int

const (
	noDrop                dropReason = iota // the zero value: nothing was dropped
	dropMalformed                           // an editor's message failed the envelope check
	dropUpstreamMalformed                   // an upstream frame without a valid ID prefix or envelope
	dropUpstreamText                        // a text frame from the upstream
	dropNoEditors                           // an upstream message for a document without local editors
	dropUpstreamDown                        // a local message while the upstream is down: the resync makes up
	dropTooBigUpstream                      // over --upstream-max-message: local editors only
	dropNotFlushed                          // not flushed upstream at the stop
	dropUntracked                           // an awareness client past the per-document table
	dropSlowEditor                          // an editor's queue was full: it is closed with 1013
	dropUpstreamDenied                      // a message of a document the server refused (hocuspocus)
	dropServerOnly                          // a message only Hocuspocus knows: not for editors
	dropStoreBehind                         // the store's queue was full: the document is repaired later
	dropStoreRepair                         // a repair of such a gap: the store asks for what it lacks
	dropStoreMalformed                      // an update or state vector the store could not read
	dropStoreWrite                          // a write or fsync of the store failed: retried
	refusedHost                             // Host header not allowed (DNS rebinding)
	refusedOrigin                           // a web page not allowed
	refusedNoDoc                            // path "/"
	refusedBadDoc                           // too long, bad UTF-8, control characters
	refusedTooMany                          // --max-connections
	refusedTooManyPerDoc                    // --max-per-document
	refusedStopping                         // the relay is stopping
	refusedNotUpgrade                       // a plain HTTP request
	closedByEditor                          // the editor sent a close frame
	closedTimeout                           // nothing heard for --peer-timeout (4408)
	closedSlow                              // its send queue was full (1013)
	closedBadFrame                          // a frame the relay does not take (1002, 1003, 1009)
	closedStop                              // the relay stopped (1001)
	closedBroken                            // the connection broke without a close frame
	editorJoined                            // not a drop: connect lines share the budget
	numDropReasons
)

// dropInfo gives each reason its name (a metrics label), the level and
// message of its log line, and how many lines it may log per warnEvery.
var dropInfo = [numDropReasons]struct {
	name  string
	level slog.Level
	msg   string
	burst int64
}{
	dropMalformed:         {"malformed", slog.LevelWarn, "malformed messages dropped", 1},
	dropUpstreamMalformed: {"upstream_malformed", slog.LevelWarn, "malformed upstream message dropped", 1},
	dropUpstreamText:      {"upstream_text", slog.LevelWarn, "upstream text frame dropped", 1},
	dropNoEditors:         {"no_editors", slog.LevelDebug, "upstream messages for a document without local editors dropped", 1},
	dropUpstreamDown:      {"upstream_down", slog.LevelDebug, "upstream down: local messages wait for the resync", 1},
	dropTooBigUpstream:    {"too_big_upstream", slog.LevelWarn, "message too large for the upstream: the document stays among local editors until the next reconnect", 1},
	dropNotFlushed:        {"not_flushed", slog.LevelWarn, "stop: upstream queue full; not flushed", 1},
	dropUntracked:         {"untracked", slog.LevelWarn, "too many awareness clients on a document; new ones are not tracked", 1},
	dropSlowEditor:        {"slow editor", slog.LevelWarn, "slow editor closed: send queue full", 1},
	dropUpstreamDenied:    {"upstream_denied", slog.LevelDebug, "message of a document the server refused dropped", 1},
	dropServerOnly:        {"server_only", slog.LevelDebug, "upstream message only Hocuspocus knows dropped", 1},
	dropStoreBehind:       {"store_behind", slog.LevelWarn, "store queue full: the document's gap is repaired from an editor or the server", 1},
	dropStoreRepair:       {"store_repair", slog.LevelInfo, "store repairs a gap", 1},
	dropStoreMalformed:    {"store_malformed", slog.LevelWarn, "store: unreadable update dropped", 1},
	dropStoreWrite:        {"store_write", slog.LevelError, "store write failed", 1},
	refusedHost:           {"host", slog.LevelWarn, "request refused", 1},
	refusedOrigin:         {"origin", slog.LevelWarn, "request refused", 1},
	refusedNoDoc:          {"no document name", slog.LevelWarn, "request refused", 1},
	refusedBadDoc:         {"bad document name", slog.LevelWarn, "request refused", 1},
	refusedTooMany:        {"too many connections", slog.LevelWarn, "request refused", 1},
	refusedTooManyPerDoc:  {"too many per document", slog.LevelWarn, "request refused", 1},
	refusedStopping:       {"stopping", slog.LevelWarn, "request refused", 1},
	refusedNotUpgrade:     {"not an upgrade", slog.LevelWarn, "request refused", 1},
	closedByEditor:        {"closed by editor", slog.LevelInfo, "editor disconnected", editorLines},
	closedTimeout:         {"peer timeout", slog.LevelInfo, "editor disconnected", editorLines},
	closedSlow:            {"slow", slog.LevelInfo, "editor disconnected", editorLines},
	closedBadFrame:        {"bad frame", slog.LevelInfo, "editor disconnected", editorLines},
	closedStop:            {"relay stopping", slog.LevelInfo, "editor disconnected", editorLines},
	closedBroken:          {"connection broken", slog.LevelInfo, "editor disconnected", editorLines},
	editorJoined:          {"joined", slog.LevelInfo, "editor connected", editorLines},
}

// editorLines is how many connect or disconnect lines of one reason are
// logged per warnEvery: a person wants to see them one by one, but a client
// in an open/close loop must not turn them into a flood.
const editorLines = 50

// String is the reason's name.
func (r dropReason) String() string { return dropInfo[r].name }

// drops counts every drop and close by reason and logs them within each
// reason's budget. Safe for any number of goroutines: atomics only, and
// nobody waits.
type drops struct {
	counts [numDropReasons]reasonCount
}

// reasonCount is one reason's counter and log budget.
type reasonCount struct {
	total  atomic.Int64 // events in all
	window atomic.Int64 // when the current budget window began, monotonic ns since monoBase
	used   atomic.Int64 // lines logged in the window
	held   atomic.Int64 // events not logged since the last line
}

// note counts one event of reason and logs it with attrs (plus the reason
// and, as count, how many events the line stands for) if the reason's
// budget allows: the first event of a reason always.
func (d *drops) note(log *slog.Logger, reason dropReason, attrs ...any) {
	if n, ok := d.allow(reason, time.Now()); ok {
		d.write(log, reason, n, attrs...)
	}
}

// write logs the line of reason for n events, with attrs. For paths that
// run per message: call allow first, so that the attributes, which
// allocate, are built only for a line that is written.
func (d *drops) write(log *slog.Logger, reason dropReason, n int64, attrs ...any) {
	if log == nil {
		return
	}
	info := dropInfo[reason]
	attrs = append(attrs, "reason", info.name)
	if n > 1 {
		attrs = append(attrs, "count", n)
	}
	log.Log(context.Background(), info.level, info.msg, attrs...)
}

// allow counts one event of reason at now and reports whether to log it,
// and for how many events the line stands.
func (d *drops) allow(reason dropReason, now time.Time) (int64, bool) {
	c := &d.counts[reason]
	c.total.Add(1)
	start, at := c.window.Load(), int64(now.Sub(monoBase))
	if at-start >= int64(warnEvery) && c.window.CompareAndSwap(start, at) {
		c.used.Store(0)
	}
	if c.used.Add(1) > dropInfo[reason].burst {
		c.held.Add(1)
		return 0, false
	}
	return 1 + c.held.Swap(0), true
}

// count counts one event of reason without logging it: for events that
// are logged elsewhere, or not at all (during the stop).
func (d *drops) count(reason dropReason) { d.counts[reason].total.Add(1) }

// total is how many events of reason were counted.
func (d *drops) total(reason dropReason) int64 { return d.counts[reason].total.Load() }

// service is a listening relay: the local HTTP endpoint, the hub and the
// upstream, started by run.
type service struct {
	cfg  *config
	log  *slog.Logger
	lns  []net.Listener
	gate gate
	hub  *hub
	up   upstreamMode // the upstream, whatever its protocol
	// store keeps documents on disk; nil with --no-store.
	store *store
	// For the status page and the metrics: when the relay started, and
	// what the upstream's goroutines note of their connections.
	started  time.Time
	upstream *upstreamStats
}

// listen binds the local address: for localhost, both 127.0.0.1 and ::1
// (where the machine has IPv6), on the same port. run starts serving.
func listen(cfg *config, log *slog.Logger) (*service, error) {
	lns, err := listenAll(cfg.host, cfg.port, log)
	if err != nil {
		return nil, err
	}
	h := newHub(connQueue, cfg.maxMessage, cfg.keepalive, cfg.limits, log)
	h.upstreamMax = cfg.upstreamMaxMessage
	h.standalone = cfg.server == nil
	var st *store
	if !cfg.noStore {
		st = openStore(cfg.storeDir(), cfg.fsyncInterval, newStoreLink(), log, h.drops)
		st.upstream, st.pushWhole, st.quit = cfg.server != nil, cfg.protocol == protocolELVA, h.quit
		var owed []string
		if st.upstream {
			owed = st.owedDocs()
		}
		h.useStore(st.link, owed)
	}
	s := &service{cfg: cfg, log: log, lns: lns, gate: cfg.gate, hub: h, up: noUpstream{}, store: st, started: time.Now(), upstream: &upstreamStats{}}
	if cfg.server == nil {
		return s, nil
	}
	u := &upstream{
		url:        cfg.server,
		user:       cfg.user,
		password:   cfg.password,
		magic:      cfg.magic,
		maxMessage: cfg.maxMessage,
		keepalive:  cfg.keepalive,
		retryMax:   cfg.retryMax,
		tls:        cfg.tls,
		hub:        h,
		log:        log,
		framing:    idFraming{cfg.magic},
		target:     h,
		stats:      s.upstream,
	}
	s.up = u
	switch cfg.protocol {
	case protocolYjs:
		s.up = newYjsRemote(*u, cfg.upstreamGrace)
	case protocolHocuspocus:
		s.up = newHocuspocusRemote(*u, cfg.token, cfg.upstreamGrace)
	}
	return s, nil
}

// acceptedConnKey is the request context key of the connection the HTTP
// server accepted the request on.
type acceptedConnKey struct{}

// noUpstream is the upstreamMode of a standalone relay: no server.
type noUpstream struct{}

// run waits for the stop.
func (noUpstream) run(ctx context.Context) error {
	<-ctx.Done()
	return nil
}

// listenAll opens the listeners for host and port.
func listenAll(host string, port int, log *slog.Logger) ([]net.Listener, error) {
	first := host
	if strings.EqualFold(host, "localhost") {
		first = "127.0.0.1"
	}
	addr := net.JoinHostPort(first, strconv.Itoa(port))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	lns := []net.Listener{ln}
	if first != host {
		// The same port on ::1, which browsers may try first for localhost.
		port := ln.Addr().(*net.TCPAddr).Port
		v6, err := net.Listen("tcp", net.JoinHostPort("::1", strconv.Itoa(port)))
		switch {
		case err == nil:
			lns = append(lns, v6)
		case errors.Is(err, syscall.EADDRINUSE):
			// Another program there would get the documents of every
			// browser that tries ::1 first.
			ln.Close()
			return nil, fmt.Errorf("listen on [::1]:%d: %w (another program has it)", port, err)
		default:
			log.Debug("not listening on ::1: no IPv6 loopback", "err", err)
		}
	}
	return lns, nil
}

// preUpgradeSlots is how many TCP connections may be open beyond
// --max-connections: requests on their way to an upgrade or a refusal.
const preUpgradeSlots = 64

// limitConns lets at most n connections be open at once on all of lns
// together; past it, Accept waits and new clients wait in the kernel's
// backlog. The hub's limits count upgraded connections only; this bounds
// what requests that never upgrade can hold. netutil.LimitListener counts
// per listener, and a split of n between 127.0.0.1 and ::1 would halve
// the room of a browser that uses only one of them, so the listeners are
// merged first and limited once. The merge's accept loops hold at most
// one connection each beyond n while they wait to hand it over.
func limitConns(lns []net.Listener, n int) net.Listener {
	return netutil.LimitListener(newMergedListener(lns), n)
}

// mergedListener accepts from several listeners as one. Each listener has
// an accept goroutine that hands its connections over on conns and
// returns at its listener's first error that is not temporary.
type mergedListener struct {
	lns       []net.Listener // static after construction
	conns     chan accepted  // from the accept goroutines to Accept; never closed
	done      chan struct{}  // closed by Close
	closeOnce sync.Once
}

// accepted is one result of a listener's Accept.
type accepted struct {
	conn net.Conn
	err  error
}

// newMergedListener starts an accept goroutine for each of lns.
func newMergedListener(lns []net.Listener) *mergedListener {
	m := &mergedListener{lns: lns, conns: make(chan accepted), done: make(chan struct{})}
	for _, ln := range lns {
		go m.acceptLoop(ln)
	}
	return m
}

// acceptLoop is ln's accept goroutine. It returns after ln's first error
// that is not temporary, or once m is closed (closing what it holds).
func (m *mergedListener) acceptLoop(ln net.Listener) {
	for {
		c, err := ln.Accept()
		select {
		case m.conns <- accepted{c, err}:
		case <-m.done:
			if c != nil {
				c.Close()
			}
			return
		}
		var ne net.Error
		if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
			return
		}
	}
}

// Accept returns the next connection from any listener, or the first
// error one of them returned, or net.ErrClosed once m is closed.
func (m *mergedListener) Accept() (net.Conn, error) {
	select {
	case a := <-m.conns:
		return a.conn, a.err
	case <-m.done:
		return nil, net.ErrClosed
	}
}

// Close closes every listener; the accept goroutines then return.
func (m *mergedListener) Close() error {
	var errs []error
	m.closeOnce.Do(func() {
		close(m.done)
		for _, ln := range m.lns {
			errs = append(errs, ln.Close())
		}
	})
	return errors.Join(errs...)
}

// Addr is the first listener's address.
func (m *mergedListener) Addr() net.Addr { return m.lns[0].Addr() }

// percentListener wraps each accepted connection in a percentConn.
type percentListener struct{ net.Listener }

// Accept returns the next connection, wrapped.
func (l percentListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &percentConn{Conn: c}, nil
}

// percentConn rewrites, in its first request line only, each '%' that
// does not start an escape into "%25" before net/http reads it. Browsers
// and the ws package send a room such as "100% sure" as /100%%20sure,
// which net/http would refuse with a bare 400. With keep-alives off, the
// first request line is the only one. Its fields are owned by the one
// goroutine that reads: net/http's, then the WebSocket reader's.
type percentConn struct {
	net.Conn
	started bool   // the request line has been read
	pending []byte // what was read ahead, rewritten, not yet returned
	err     error  // the read error that ended the read-ahead
}

// Read returns the rewritten request line and what was read with it,
// then reads the connection directly.
func (c *percentConn) Read(p []byte) (int, error) {
	if !c.started {
		c.started = true
		c.pending, c.err = c.readRequestLine()
	}
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		if c.pending = c.pending[n:]; len(c.pending) == 0 {
			c.pending = nil // an upgraded connection lives long: free the read-ahead buffer
		}
		return n, nil
	}
	if c.err != nil {
		err := c.err
		c.err = nil
		return 0, err
	}
	return c.Conn.Read(p)
}

// readRequestLine reads until the first line feed, at most maxHeaderBytes,
// and returns what it read with the request line rewritten; without a
// line feed in that much, or after a read error, it returns it unchanged
// and the error.
func (c *percentConn) readRequestLine() ([]byte, error) {
	buf := make([]byte, 0, 1024)
	for len(buf) < maxHeaderBytes {
		if len(buf) == cap(buf) {
			buf = append(buf, make([]byte, len(buf))...)[:len(buf)]
		}
		n, err := c.Conn.Read(buf[len(buf):min(cap(buf), maxHeaderBytes)])
		buf = buf[:len(buf)+n]
		if bytes.IndexByte(buf, '\n') >= 0 {
			return rewritePercent(buf), err
		}
		if err != nil {
			return buf, err
		}
	}
	return buf, nil
}

// rewritePercent returns b with each '%' in the path of its first line's
// request target that is not followed by two hex digits replaced by
// "%25", as a browser decodes it: it stays a literal '%'. The query is
// left alone (net/http does not check it, and the relay ignores it), and
// so is everything when b holds no request line.
func rewritePercent(b []byte) []byte {
	end := bytes.IndexByte(b, '\n')
	if end < 0 {
		return b
	}
	line := bytes.TrimSuffix(b[:end], []byte("\r"))
	sp := bytes.IndexByte(line, ' ')
	if sp < 0 {
		return b
	}
	start := sp + 1
	stop := len(line)
	if i := bytes.IndexAny(line[start:], " ?"); i >= 0 {
		stop = start + i
	}
	path := line[start:stop]
	if bytes.IndexByte(path, '%') < 0 {
		return b
	}
	out := make([]byte, 0, len(b)+2*bytes.Count(path, []byte("%")))
	out = append(out, b[:start]...)
	for i := 0; i < len(path); i++ {
		out = append(out, path[i])
		if path[i] == '%' && !(i+2 < len(path) && isHex(path[i+1]) && isHex(path[i+2])) {
			out = append(out, '2', '5')
		}
	}
	return append(out, b[stop:]...)
}

// isHex reports whether b is a hexadecimal digit.
func isHex(b byte) bool {
	return '0' <= b && b <= '9' || 'a' <= b && b <= 'f' || 'A' <= b && b <= 'F'
}

// addr is the first address the relay listens on, with the port it got.
func (s *service) addr() string { return s.lns[0].Addr().String() }

// run serves until ctx ends (exit status 0) or the upstream refuses the
// credentials or the listener fails (1). Then it stops accepting, lets the
// hub close every conn with "going away" and the upstream writer flush its
// queue, and waits for both within stopTimeout.
func (s *service) run(ctx context.Context) int {
	s.logStart()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	hubDone := make(chan struct{})
	go func() {
		s.hub.run(ctx)
		close(hubDone)
	}()
	upDone := make(chan error, 1)
	go func() { upDone <- s.up.run(ctx) }()
	if s.store != nil {
		go s.store.run()
	}
	srv := s.httpServer()
	srvDone := make(chan error, 1)
	ln := percentListener{limitConns(s.lns, s.cfg.limits.conns+preUpgradeSlots)}
	go func() { srvDone <- srv.Serve(ln) }()

	status := 0
	upWait := (<-chan error)(upDone)
	select {
	case <-ctx.Done():
		s.log.Info("stopping")
	case err := <-upDone:
		s.log.Error("upstream failed; stopping", "err", err)
		upWait = nil // already returned
		status = 1
	case err := <-srvDone:
		s.log.Error("local server failed; stopping", "err", err)
		status = 1
	}
	cancel()
	srv.Close() // stops accepting; upgraded conns are the hub's to close
	<-hubDone
	s.waitForStop(upWait)
	s.waitForStore()
	s.log.Info("stopped")
	return status
}

// logStart logs the listening addresses with the server and version, where
// documents are kept, and the configuration's warnings.
func (s *service) logStart() {
	for _, ln := range s.lns {
		if s.cfg.server == nil {
			s.log.Info("listening", "addr", ln.Addr().String(), "server", "none", "version", buildVersion())
		} else {
			s.log.Info("listening", "addr", ln.Addr().String(), "server", s.cfg.server.String(), "protocol", s.cfg.protocol, "version", buildVersion())
		}
	}
	s.logStore()
	for _, w := range s.cfg.warnings {
		s.log.Warn(w)
	}
}

// httpServer is the local HTTP server, with s as its handler.
func (s *service) httpServer() *http.Server {
	srv := &http.Server{
		Handler: s,
		// The accepted connection, for an editor's writer to write its
		// frames in batches (writeBatch).
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, acceptedConnKey{}, c)
		},
		ReadHeaderTimeout: handshakeTimeout,
		// Bounds the answers to plain requests for a client that does not
		// read them; a hijacked WebSocket has its deadlines cleared.
		WriteTimeout:   handshakeTimeout,
		IdleTimeout:    handshakeTimeout,
		MaxHeaderBytes: maxHeaderBytes,
		ErrorLog:       slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	// A local relay gains nothing from keep-alive, and with one request per
	// connection percentConn needs to rewrite only the first request line.
	srv.SetKeepAlivesEnabled(false)
	return srv
}

// logStore says where documents are kept, or that they are not.
func (s *service) logStore() {
	switch {
	case s.store != nil && s.cfg.server == nil:
		s.log.Info("no server: documents stay on this machine", "data_dir", s.store.dir)
	case s.store != nil:
		s.log.Info("documents are kept on this machine too", "data_dir", s.store.dir)
	case s.cfg.server == nil:
		s.log.Warn("no server and --no-store: editors share documents only while one of them is connected; nothing is kept")
	}
}

// waitForStore waits for the store to write and fsync what it holds. It
// has no deadline short of storeStopTimeout: what it writes is what the
// relay promised to keep.
func (s *service) waitForStore() {
	if s.store == nil {
		return
	}
	timeout := time.NewTimer(storeStopTimeout)
	defer timeout.Stop()
	select {
	case <-s.store.link.done:
	case <-timeout.C:
		s.log.Error("stop: the store did not finish writing in time; the last edits may be lost", "data_dir", s.store.dir)
	}
}

// storeStopTimeout bounds the wait for the store's last write at the stop.
const storeStopTimeout = 30 * time.Second

// waitForStop waits up to stopTimeout for the upstream to flush. The
// hub's stop has waited for the local readers already. upDone is nil when
// the upstream is done.
func (s *service) waitForStop(upDone <-chan error) {
	if upDone == nil {
		return
	}
	timeout := time.NewTimer(stopTimeout)
	defer timeout.Stop()
	select {
	case <-upDone:
	case <-timeout.C:
		s.log.Warn("stop: upstream did not flush in time; exiting anyway")
	}
}

// ServeHTTP answers one local request: a WebSocket upgrade on /<document>
// that passes the gate and the connection limits joins that document; a
// plain request for / or /metrics gets the status or the metrics (an
// upgrade there is a document like any other); anything else gets a
// short, clear HTTP answer before any upgrade.
func (s *service) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !isWebSocketUpgrade(r) && (r.URL.Path == "/" || r.URL.Path == metricsPath) {
		s.serveInfo(w, r)
		return
	}
	doc, status, kind, detail := s.gate.check(r)
	if status != 0 {
		s.refuse(w, r, status, kind, detail)
		return
	}
	if !isWebSocketUpgrade(r) {
		w.Header().Set("Upgrade", "websocket")
		s.refuse(w, r, http.StatusUpgradeRequired, refusedNotUpgrade,
			"this is a Yjs WebSocket relay; open ws://"+r.Host+r.URL.EscapedPath()+" with a Yjs client")
		return
	}
	if err := s.hub.admit(doc); err != nil {
		s.refuse(w, r, http.StatusServiceUnavailable, admitRefusal(err), err.Error())
		return
	}
	defer s.hub.release(doc)
	ws := websocket.Server{
		// The gate has decided about Origin already; websocket.Handler
		// would refuse the native clients that send none.
		Handshake: func(*websocket.Config, *http.Request) error { return nil },
		Handler:   func(ws *websocket.Conn) { s.hub.serve(ws, doc) },
	}
	ws.ServeHTTP(w, r)
}

// admitRefusal names the reason of an error from hub.admit.
func admitRefusal(err error) dropReason {
	switch {
	case errors.Is(err, errTooManyPerDoc):
		return refusedTooManyPerDoc
	case errors.Is(err, errStopping):
		return refusedStopping
	default:
		return refusedTooMany
	}
}

// refuse answers a request that may not connect, with detail in the body,
// and logs it with its kind and detail. The first refusal of each kind is
// logged, then at most one per kind and warnEvery, with the count since
// (handlers run in many goroutines, hence the lock-free throttles).
func (s *service) refuse(w http.ResponseWriter, r *http.Request, status int, kind dropReason, detail string) {
	http.Error(w, "elva-service: "+detail, status)
	s.hub.drops.note(s.log, kind, "detail", detail, "status", status,
		"origin", r.Header.Get("Origin"), "host", r.Host, "remote", r.RemoteAddr)
}

// maxIDBytes is the longest document name accepted, after percent-decoding.
const maxIDBytes = 250

// gate decides who may connect, before any upgrade: the Host header (a
// DNS-rebinding page sends its own name), the Origin header (any web page
// may open a WebSocket to localhost; its browser names the page's origin)
// and the document name. Static after construction.
type gate struct {
	host      string          // the configured HOST, also fine as Host header
	anyIP     bool            // bound to 0.0.0.0 or ::: any IP literal is a fine Host
	origins   map[string]bool // --allow-origin, exact
	anyOrigin bool            // --allow-origin '*'
}

// check returns the document r asks for, or the status, kind and detail
// to refuse it with.
func (g *gate) check(r *http.Request) (doc string, status int, kind dropReason, detail string) {
	if status, kind, detail = g.checkSender(r); status != 0 {
		return "", status, kind, detail
	}
	// r.URL.Path is percent-decoded and has no query: /Gr%C3%BC%C3%9Fe?x=1
	// is the document "Grüße", the same for every kind of client.
	doc = strings.TrimPrefix(r.URL.Path, "/")
	if doc == "" {
		return "", http.StatusForbidden, refusedNoDoc, "no document name; connect to ws://" + r.Host + "/<document>"
	}
	if err := checkIdentifier(doc); err != nil {
		return "", http.StatusBadRequest, refusedBadDoc, err.Error()
	}
	return doc, 0, noDrop, ""
}

// checkSender checks r's Host and Origin, for every request (upgrades,
// the status page, the metrics), and returns the status, kind and detail
// to refuse it with; status 0: it may go on.
func (g *gate) checkSender(r *http.Request) (status int, kind dropReason, detail string) {
	if !g.hostAllowed(r.Host) {
		return http.StatusForbidden, refusedHost, fmt.Sprintf("host %q not allowed: connect to localhost or 127.0.0.1", r.Host)
	}
	if origin := r.Header.Get("Origin"); origin != "" && !g.originAllowed(origin) {
		return http.StatusForbidden, refusedOrigin, fmt.Sprintf("origin %q not allowed (see --allow-origin)", origin)
	}
	return 0, noDrop, ""
}

// hostAllowed accepts loopback names and addresses, the configured host
// and, when the relay listens on every address, any IP literal: DNS
// rebinding needs a name, and an IP cannot be rebound.
func (g *gate) hostAllowed(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	switch {
	case host == "":
		return false
	case isLoopbackName(strings.ToLower(host)), strings.EqualFold(host, g.host):
		return true
	}
	return g.anyIP && net.ParseIP(host) != nil
}

// originAllowed accepts pages served from this machine's loopback (http or
// https, any port) and the origins listed with --allow-origin.
func (g *gate) originAllowed(origin string) bool {
	if g.anyOrigin {
		return true
	}
	norm, ok := normalOrigin(origin)
	if !ok {
		return false
	}
	if g.origins[norm] {
		return true
	}
	u, _ := url.Parse(norm)
	return isLoopbackName(u.Hostname())
}

// checkIdentifier accepts valid UTF-8 without control characters, of at
// most maxIDBytes bytes.
func checkIdentifier(doc string) error {
	if len(doc) > maxIDBytes {
		return fmt.Errorf("document name is %d bytes long, at most %d are allowed", len(doc), maxIDBytes)
	}
	if !utf8.ValidString(doc) {
		return errors.New("document name is not valid UTF-8")
	}
	for _, r := range doc {
		if unicode.IsControl(r) {
			return fmt.Errorf("document name contains the control character %U", r)
		}
	}
	return nil
}

// isWebSocketUpgrade reports whether r asks to switch to WebSocket.
func isWebSocketUpgrade(r *http.Request) bool {
	return headerHasToken(r.Header, "Connection", "upgrade") && headerHasToken(r.Header, "Upgrade", "websocket")
}

// headerHasToken reports whether a comma-separated header lists token.
// It is what httpguts.HeaderValuesContainsToken does, but httpguts imports
// x/net/idna and with it golang.org/x/text, a second module in go.mod for
// these ten lines.
func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// metricsPath is where a plain GET finds the Prometheus metrics.
const metricsPath = "/metrics"

// statusPage is the status page: one self-contained HTML document that
// polls the status JSON (see statusReport) and draws it.
//
//go:embed status.html
var statusPage []byte

// statusTimeout bounds the wait for the hub's snapshot: a stopping hub
// may be busy.
const statusTimeout = 2 * time.Second

// serveInfo answers a plain request for / (the status: HTML for a
// browser, JSON otherwise) or /metrics, after the same Host and Origin
// checks as an upgrade. Only GET and HEAD are answered.
func (s *service) serveInfo(w http.ResponseWriter, r *http.Request) {
	if status, kind, detail := s.gate.checkSender(r); status != 0 {
		s.refuse(w, r, status, kind, detail)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "elva-service: "+r.Method+" not allowed here; GET the status or the metrics", http.StatusMethodNotAllowed)
		return
	}
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	if r.URL.Path == "/" && wantsHTML(r) {
		// The page needs nothing but itself and the JSON from this origin.
		h.Set("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'")
		h.Set("Content-Type", "text/html; charset=utf-8")
		w.Write(statusPage)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), statusTimeout)
	defer cancel()
	hs, err := s.hub.status(ctx)
	if err != nil {
		http.Error(w, "elva-service: no status: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	rep := s.statusReport(hs, time.Now())
	if r.URL.Path == metricsPath {
		h.Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		w.Write(rep.metrics(s.hub.drops))
		return
	}
	h.Set("Content-Type", "application/json")
	body, err := json.MarshalIndent(rep, "", "  ")
	if err != nil { // only plain values: cannot happen
		http.Error(w, "elva-service: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Write(append(body, '\n'))
}

// wantsHTML reports whether r's Accept header names text/html before (or
// without) application/json: a browser navigating to the page.
func wantsHTML(r *http.Request) bool {
	accept := r.Header.Get("Accept")
	html, json := strings.Index(accept, "text/html"), strings.Index(accept, "application/json")
	return html >= 0 && (json < 0 || html < json)
}

// statusReport is the status JSON (GET / without text/html), and what the
// metrics are written from. Its field names are the JSON's: the status
// page and scripts read them.
type statusReport struct {
	Version   string           `json:"version"`
	StartedAt time.Time        `json:"started_at"`
	Uptime    float64          `json:"uptime_seconds"`
	Listening []string         `json:"listening"`
	Editors   int              `json:"editors"`
	Upstream  upstreamReport   `json:"upstream"`
	Store     storeReport      `json:"store"`
	Documents []documentReport `json:"documents"`
	// Traffic is every message in all, from and to the editors and the
	// server, since the start.
	Traffic map[string]trafficReport `json:"traffic"`
	// Drops, Refusals and Closes count by reason (nonzero only): dropped
	// messages, refused requests, editors' connections ended.
	Drops    map[string]int64 `json:"drops"`
	Refusals map[string]int64 `json:"refusals"`
	Closes   map[string]int64 `json:"editor_closes"`
	Joins    int64            `json:"editor_joins"`
}

// upstreamReport is the upstream's part of statusReport. State is
// upstreamStats.state, or "none" without a server.
type upstreamReport struct {
	Protocol       string     `json:"protocol"`
	Server         string     `json:"server"`
	State          string     `json:"state"`
	ConnectedSince *time.Time `json:"connected_since"`
	Connections    int64      `json:"connections"`
	Reconnects     int64      `json:"reconnects"`
	Failures       int64      `json:"failures"`
	LastError      string     `json:"last_error"`
	LastCloseCode  int64      `json:"last_close_code"`
}

// storeReport is the store's part of statusReport; Bytes counts the
// document files' bytes on disk.
type storeReport struct {
	Enabled      bool       `json:"enabled"`
	DataDir      string     `json:"data_dir,omitempty"`
	Documents    int        `json:"documents"`
	Bytes        int64      `json:"bytes"`
	Owed         []string   `json:"owed"`
	FailingSince *time.Time `json:"failing_since"`
	Error        string     `json:"error,omitempty"`
}

// documentReport is one open document: in is what the relay received for
// it (from editors and the server), out what it sent (to both), since the
// document was opened; Held: open upstream for the store, no editor.
type documentReport struct {
	Name     string `json:"name"`
	Editors  int    `json:"editors"`
	MsgsIn   uint64 `json:"messages_in"`
	BytesIn  uint64 `json:"bytes_in"`
	MsgsOut  uint64 `json:"messages_out"`
	BytesOut uint64 `json:"bytes_out"`
	Held     bool   `json:"held"`
	Owed     bool   `json:"owed"`
}

// trafficReport is a traffic in JSON.
type trafficReport struct {
	MsgsIn   uint64 `json:"messages_in"`
	BytesIn  uint64 `json:"bytes_in"`
	MsgsOut  uint64 `json:"messages_out"`
	BytesOut uint64 `json:"bytes_out"`
}

// report is t in JSON.
func (t traffic) report() trafficReport {
	return trafficReport{MsgsIn: t.msgsIn, BytesIn: t.bytesIn, MsgsOut: t.msgsOut, BytesOut: t.bytesOut}
}

// statusReport puts the hub's snapshot hs together with the upstream's
// and the store's figures and the drop counters, as of now.
func (s *service) statusReport(hs hubStatus, now time.Time) *statusReport {
	rep := &statusReport{
		Version:   buildVersion(),
		StartedAt: s.started.UTC().Truncate(time.Millisecond),
		Uptime:    now.Sub(s.started).Seconds(),
		Editors:   hs.editors,
		Upstream:  s.upstreamReport(),
		Store:     s.storeReport(),
		Documents: make([]documentReport, 0, len(hs.docs)),
		Traffic:   map[string]trafficReport{"editors": hs.editorTraffic.report(), "server": hs.serverTraffic.report()},
		Drops:     map[string]int64{},
		Refusals:  map[string]int64{},
		Closes:    map[string]int64{},
		Joins:     s.hub.drops.total(editorJoined),
	}
	for _, ln := range s.lns {
		rep.Listening = append(rep.Listening, ln.Addr().String())
	}
	owed := make(map[string]bool, len(rep.Store.Owed))
	for _, name := range rep.Store.Owed {
		owed[name] = true
	}
	for _, d := range hs.docs {
		rep.Documents = append(rep.Documents, documentReport{
			Name: d.name, Editors: d.editors, Held: d.held, Owed: owed[d.name],
			MsgsIn: d.traffic.msgsIn, BytesIn: d.traffic.bytesIn, MsgsOut: d.traffic.msgsOut, BytesOut: d.traffic.bytesOut,
		})
	}
	for r := noDrop + 1; r < numDropReasons; r++ {
		if n := s.hub.drops.total(r); n > 0 {
			if g := groupOf(r); g != nil {
				(*g.of(rep))[r.label()] = n
			}
		}
	}
	return rep
}

// upstreamReport is the upstream's part of the status now.
func (s *service) upstreamReport() upstreamReport {
	if s.cfg.server == nil {
		return upstreamReport{State: "none"}
	}
	st := s.upstream
	rep := upstreamReport{
		Protocol:      s.cfg.protocol,
		Server:        s.cfg.server.String(),
		Connections:   st.open.Load(),
		Reconnects:    st.reconnects.Load(),
		Failures:      st.failures.Load(),
		LastCloseCode: st.lastClose.Load(),
	}
	if e := st.lastError.Load(); e != nil {
		rep.LastError = *e
	}
	rep.State = st.state()
	if ns := st.since.Load(); ns != 0 {
		t := time.Unix(0, ns).UTC().Truncate(time.Millisecond)
		rep.ConnectedSince = &t
	}
	return rep
}

// storeReport is the store's part of the status now.
func (s *service) storeReport() storeReport {
	if s.store == nil {
		return storeReport{Owed: []string{}}
	}
	sum := s.store.summary()
	rep := storeReport{Enabled: true, DataDir: sum.dir, Documents: sum.documents, Bytes: sum.bytes, Owed: sum.owed}
	if rep.Owed == nil {
		rep.Owed = []string{}
	}
	if !sum.failing.IsZero() {
		t := sum.failing.UTC().Truncate(time.Millisecond)
		rep.FailingSince = &t
	}
	if sum.err != nil {
		rep.Error = sum.err.Error()
	}
	return rep
}

// reasonGroup is a range of drop reasons counted in one metric family
// and one JSON object of the status.
type reasonGroup struct {
	first, last dropReason
	metric      string // the counter family's name
	help        string
	of          func(*statusReport) *map[string]int64
}

// reasonGroups are the drops, the refusals and the editor closes;
// editorJoined is counted alone.
var reasonGroups = []reasonGroup{
	{dropMalformed, dropStoreWrite, "elva_drops_total", "Messages dropped, and store writes failed, by reason.", func(r *statusReport) *map[string]int64 { return &r.Drops }},
	{refusedHost, refusedNotUpgrade, "elva_refusals_total", "Local requests refused before any upgrade, by reason.", func(r *statusReport) *map[string]int64 { return &r.Refusals }},
	{closedByEditor, closedBroken, "elva_editor_closes_total", "Local editors' connections ended, by reason.", func(r *statusReport) *map[string]int64 { return &r.Closes }},
}

// groupOf is the group of r; nil for noDrop and editorJoined.
func groupOf(r dropReason) *reasonGroup {
	for i := range reasonGroups {
		if g := &reasonGroups[i]; r >= g.first && r <= g.last {
			return g
		}
	}
	return nil
}

// label is the reason's name as a metrics label value and a JSON key:
// words joined by underscores.
func (r dropReason) label() string { return strings.ReplaceAll(r.String(), " ", "_") }

// metrics writes rep in the Prometheus text exposition format (version
// 0.0.4: "# HELP" and "# TYPE" lines, then one sample per line), with
// every reason of d, zero or not, so that each series exists from the
// start.
func (rep *statusReport) metrics(d *drops) []byte {
	var m metricsText
	m.family("elva_build_info", "gauge", "The relay's version; always 1.")
	m.sample("elva_build_info", 1, "version", rep.Version)
	m.family("elva_start_time_seconds", "gauge", "When the relay started, in seconds since the Unix epoch.")
	m.sample("elva_start_time_seconds", float64(rep.StartedAt.UnixMilli())/1e3)
	m.family("elva_editors", "gauge", "Local editors connected now.")
	m.sample("elva_editors", float64(rep.Editors))
	m.family("elva_documents_open", "gauge", "Documents open now: with local editors, or held open upstream for the store.")
	m.sample("elva_documents_open", float64(len(rep.Documents)))
	rep.trafficMetrics(&m)
	rep.documentMetrics(&m)
	rep.upstreamMetrics(&m)
	rep.storeMetrics(&m)
	for _, g := range reasonGroups {
		m.family(g.metric, "counter", g.help)
		for r := g.first; r <= g.last; r++ {
			m.sample(g.metric, float64(d.total(r)), "reason", r.label())
		}
	}
	m.family("elva_editor_joins_total", "counter", "Local editors connected, in all.")
	m.sample("elva_editor_joins_total", float64(rep.Joins))
	return m.b
}

// trafficMetrics writes the relay's messages and bytes in all, by peer.
func (rep *statusReport) trafficMetrics(m *metricsText) {
	for _, f := range []struct {
		name, help, dir string
		value           func(trafficReport) uint64
	}{
		{"elva_messages_received_total", "Messages received, from the local editors or the server.", "from", func(t trafficReport) uint64 { return t.MsgsIn }},
		{"elva_received_bytes_total", "Bytes of the messages received, from the local editors or the server.", "from", func(t trafficReport) uint64 { return t.BytesIn }},
		{"elva_messages_sent_total", "Messages queued to be sent, to the local editors or the server.", "to", func(t trafficReport) uint64 { return t.MsgsOut }},
		{"elva_sent_bytes_total", "Bytes of the messages queued to be sent, to the local editors or the server.", "to", func(t trafficReport) uint64 { return t.BytesOut }},
	} {
		m.family(f.name, "counter", f.help)
		for _, peer := range []string{"editors", "server"} {
			m.sample(f.name, float64(f.value(rep.Traffic[peer])), f.dir, peer)
		}
	}
}

// documentMetrics writes each open document's editors and traffic (since
// the document was opened: a counter that starts again when it reopens).
func (rep *statusReport) documentMetrics(m *metricsText) {
	for _, f := range []struct {
		name, typ, help string
		value           func(documentReport) float64
	}{
		{"elva_document_editors", "gauge", "Local editors of an open document.", func(d documentReport) float64 { return float64(d.Editors) }},
		{"elva_document_messages_received_total", "counter", "Messages received for an open document, from editors and the server.", func(d documentReport) float64 { return float64(d.MsgsIn) }},
		{"elva_document_received_bytes_total", "counter", "Bytes received for an open document.", func(d documentReport) float64 { return float64(d.BytesIn) }},
		{"elva_document_messages_sent_total", "counter", "Messages of an open document queued to editors and the server.", func(d documentReport) float64 { return float64(d.MsgsOut) }},
		{"elva_document_sent_bytes_total", "counter", "Bytes of an open document queued to editors and the server.", func(d documentReport) float64 { return float64(d.BytesOut) }},
	} {
		m.family(f.name, f.typ, f.help)
		for _, d := range rep.Documents {
			m.sample(f.name, f.value(d), "document", d.Name)
		}
	}
}

// upstreamMetrics writes the upstream's connections; nothing without a
// server.
func (rep *statusReport) upstreamMetrics(m *metricsText) {
	u := rep.Upstream
	if u.State == "none" {
		return
	}
	m.family("elva_upstream_info", "gauge", "The server and its protocol; always 1.")
	m.sample("elva_upstream_info", 1, "protocol", u.Protocol, "server", u.Server)
	m.family("elva_upstream_connections", "gauge", "Connections to the server up now (yjs: one per open document).")
	m.sample("elva_upstream_connections", float64(u.Connections))
	since := 0.0
	if u.ConnectedSince != nil {
		since = float64(u.ConnectedSince.UnixMilli()) / 1e3
	}
	m.family("elva_upstream_connected_since_seconds", "gauge", "Since when a connection to the server has been up, in seconds since the Unix epoch; 0: none is.")
	m.sample("elva_upstream_connected_since_seconds", since)
	m.family("elva_upstream_reconnects_total", "counter", "Connections to the server made after one was lost.")
	m.sample("elva_upstream_reconnects_total", float64(u.Reconnects))
	m.family("elva_upstream_failures_total", "counter", "Attempts to connect to the server that failed.")
	m.sample("elva_upstream_failures_total", float64(u.Failures))
	m.family("elva_upstream_last_close_code", "gauge", "The close code of the last connection lost (1006: without a close frame); 0: none was.")
	m.sample("elva_upstream_last_close_code", float64(u.LastCloseCode))
}

// storeMetrics writes the store's documents, bytes and owed documents;
// nothing with --no-store.
func (rep *statusReport) storeMetrics(m *metricsText) {
	st := rep.Store
	if !st.Enabled {
		return
	}
	failing := 0.0
	if st.FailingSince != nil {
		failing = 1
	}
	m.family("elva_store_documents", "gauge", "Document files in the store.")
	m.sample("elva_store_documents", float64(st.Documents))
	m.family("elva_store_bytes", "gauge", "Bytes of the store's document files.")
	m.sample("elva_store_bytes", float64(st.Bytes))
	m.family("elva_store_owed_documents", "gauge", "Documents with local edits the server may lack.")
	m.sample("elva_store_owed_documents", float64(len(st.Owed)))
	m.family("elva_store_write_failing", "gauge", "1 while the store's writes fail (it retries), else 0.")
	m.sample("elva_store_write_failing", failing)
}

// metricsText builds a text exposition (Prometheus text format 0.0.4).
type metricsText struct{ b []byte }

// family starts a metric family with its HELP and TYPE lines.
func (m *metricsText) family(name, typ, help string) {
	m.b = fmt.Appendf(m.b, "# HELP %s %s\n# TYPE %s %s\n", name, escapeHelp(help), name, typ)
}

// sample writes one sample of name with value and the label pairs in
// labels (name, value, name, value...), values escaped.
func (m *metricsText) sample(name string, value float64, labels ...string) {
	m.b = append(m.b, name...)
	for i := 0; i+1 < len(labels); i += 2 {
		sep := byte(',')
		if i == 0 {
			sep = '{'
		}
		m.b = append(m.b, sep)
		m.b = append(m.b, labels[i]...)
		m.b = append(m.b, '=', '"')
		m.b = append(m.b, escapeLabel(labels[i+1])...)
		m.b = append(m.b, '"')
	}
	if len(labels) > 0 {
		m.b = append(m.b, '}')
	}
	m.b = append(m.b, ' ')
	m.b = strconv.AppendFloat(m.b, value, 'g', -1, 64)
	m.b = append(m.b, '\n')
}

// labelEscaper and helpEscaper escape what the text format requires: in
// label values a backslash, a double quote and a line feed; in HELP text a
// backslash and a line feed.
var (
	labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)
	helpEscaper  = strings.NewReplacer(`\`, `\\`, "\n", `\n`)
)

// escapeLabel escapes a label value.
func escapeLabel(v string) string { return labelEscaper.Replace(v) }

// escapeHelp escapes HELP text.
func escapeHelp(v string) string { return helpEscaper.Replace(v) }
