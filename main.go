// Command elva-service relays Yjs messages between local editors and a
// remote server (ELVA, a Yjs server, Hocuspocus), and keeps every document
// in a local store.
//
// Local editors connect to ws://HOST:PORT/<document> with any Yjs client.
// Each local conn has a reader goroutine, and a writer goroutine only while
// something waits to be written. Readers send frames to the hub; the hub
// alone owns document → conns and copies each frame to the other conns'
// send queues, to the upstream queue and to the store's queue. The
// upstream writer frames each message for the server's protocol; the
// upstream reader unframes what comes back and hands it to the hub, which
// passes it to every local editor of that document. No queue is unbounded
// and the hub never blocks: a conn that cannot keep up is closed, and its
// client resyncs on reconnect.
package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	_ "embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"reflect"
	"runtime"
	"runtime/debug"
	"slices"
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
may come in any order. http://HOST:PORT/ in a browser is the status page
(JSON for other clients); http://HOST:PORT/metrics the Prometheus metrics.

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
                      half-open connections (default 30s, or three ping
                      intervals if longer; 0: never)
  --retry-max D       longest wait between upstream reconnect attempts
                      (default 30s; the waits start at 0.5s and double)
  --config FILE       read the settings from FILE (TOML) only; without it,
                      the first elva.toml in this directory or a parent, over
                      $XDG_CONFIG_HOME/elva/elva.toml (~/.config/elva/elva.toml;
                      on macOS ~/Library/Application Support/elva/elva.toml)
  --print-config      print the effective settings, each with where it came
                      from (flag, env, file:line, default), secrets redacted,
                      and exit
  --log FILE          append logs to FILE instead of stderr; SIGHUP reopens
                      it (for logrotate)
  --log-format F      text (default) or json (one JSON object per line)
  -v, --verbose       log every message (debug level)
  --quiet             log warnings and errors only
  --version           print the version and exit
  -h, --help          print this help and exit

Flags beat the ELVA_* environment variables, which beat the configuration
file, which beats the defaults. The file may hold the seed's [app.default]
and [app.service], ELVA's [connect], [basic], [tls] and [log], and this
relay's [service] with every flag above by its long name, plus host and
port to listen on; see "Configuration file" in the README. An elva.toml
found in this directory or a parent may come with a cloned repository: it
may name the server and tuning, not secrets, origins, the listening host,
the CA or the data directory, and it is skipped unless it is yours and
only you may write it.

Examples:
  elva-service
  elva-service --server wss://elva.example.org/
  ELVA_USER=ada ELVA_PASSWORD=secret elva-service --server wss://elva.example.org/ localhost 8000
  elva-service 127.0.0.1 9000 --server ws://127.0.0.1:8765/ --id-magic 4944 -v

Exit status: 0 after a stop by signal, 1 on a runtime failure (listening,
the log file, upstream credentials refused, [basic] command failing), 2 on
bad flags, arguments or configuration, 128+n after a second signal n.
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
	// level and logFormat are the log's (-v, --quiet, --log-format, a
	// file's level); levelFrom says where the level came from.
	level     slog.Level
	levelFrom string
	logFormat string
	// printConfig asks run to print shown, the effective settings, and
	// exit (--print-config); configFiles are the files read, the later
	// winning, projectFile the one among them found in the directory tree
	// ("" if none); userFrom, passwordFrom and tokenFrom say where the
	// credentials came from.
	printConfig                       bool
	shown                             []shownSetting
	configFiles                       []string
	projectFile                       string
	userFrom, passwordFrom, tokenFrom string
	// passwordCommand is a file's [basic] command whose output's first
	// line is the password, given at passwordCommandAt; nil unless the
	// password is to come from it. runPasswordCommand runs it.
	passwordCommand   []string
	passwordCommandAt string
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
	if cfg.printConfig {
		printConfig(stdout, cfg)
		return 0
	}
	if cfg.listDocs || cfg.removeDoc != "" {
		return storeTool(cfg, stdout, stderr)
	}
	log, lf, err := newLogger(cfg, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "elva-service: %v\n", err)
		return 1
	}
	if lf != nil {
		defer lf.Close()
		fmt.Fprintf(stderr, "elva-service: logging to %s\n", lf.path)
	}
	logConfigFiles(log, cfg)
	// An error that ends the start goes to the terminal (or the service
	// manager's journal) too, not only to a log file nobody watches yet.
	startFailed := func(msg string, err error) int {
		log.Error(msg, "err", err)
		if lf != nil {
			fmt.Fprintf(stderr, "elva-service: %s: %v\n", msg, err)
		}
		return 1
	}
	if err := cfg.runPasswordCommand(); err != nil {
		return startFailed("cannot get the password", err)
	}
	// Also without a log file: a SIGHUP from a habit (or systemctl
	// reload) must not end the relay, as its default action would.
	defer reopenOnHangup(lf, log)() // stops before the close

	slog.SetDefault(log) // for the signal goroutine, started before log
	s, err := listen(cfg, log)
	if err != nil {
		return startFailed("cannot start", err)
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
	noun := "documents"
	if len(list) == 1 {
		noun = "document"
	}
	fmt.Fprintf(stdout, "%d %s in %s\n", len(list), noun, dir)
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
	configFile, logFormat                                 *string
	fsyncInterval                                         *time.Duration
	noStore, listDocs, printConfig                        bool
	pingInterval, peerTimeout, retryMax, upstreamGrace    *time.Duration
	maxConns, maxPerDoc                                   *int
	origins                                               originList
	verbose, quiet, showVersion, insecureAuth             bool
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
		configFile:    fs.String("config", "", ""),
		logFormat:     fs.String("log-format", "text", ""),
	}
	fs.BoolVar(&v.printConfig, "print-config", false, "")
	fs.BoolVar(&v.quiet, "quiet", false, "")
	fs.BoolVar(&v.noStore, "no-store", false, "")
	fs.BoolVar(&v.listDocs, "list-docs", false, "")
	fs.Var(&v.origins, "allow-origin", "")
	fs.BoolVar(&v.verbose, "v", false, "")
	fs.BoolVar(&v.verbose, "verbose", false, "")
	fs.BoolVar(&v.showVersion, "version", false, "")
	fs.BoolVar(&v.insecureAuth, "allow-insecure-auth", false, "")
	return v
}

// parseArgs reads flags, the positional HOST and PORT in any order, the
// ELVA_* environment variables and the configuration files: flags beat
// the environment, which beats the files, which beat the defaults. An
// error over a value a file gave names the file and line. The search for
// a project file starts in the working directory (workDir).
func parseArgs(args []string, getenv func(string) string) (*config, error) {
	return parseArgsIn(args, getenv, workDir())
}

// workDir is where the search for a project file starts: the working
// directory, "" (no search) without one. A variable for the tests, which
// must not read an elva.toml that happens to lie above the checkout.
var workDir = func() string {
	dir, err := os.Getwd()
	if err != nil {
		return "" // no project file without a working directory
	}
	return dir
}

// parseArgsIn is parseArgs with the search for a project file starting in
// dir, and in none if dir is "".
func parseArgsIn(args []string, getenv func(string) string, dir string) (*config, error) {
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
	l := layers{fs: fs, getenv: getenv, kinds: settingKinds(fs)}
	if l.file, err = readConfigFiles(*v.configFile, dir, getenv, l.kinds); err != nil {
		return nil, err
	}
	cfg, err := buildConfig(l, v, positional)
	return cfg, l.hint(err)
}

// buildConfig checks the settings of every layer and takes them into a
// config.
func buildConfig(l layers, v *flagValues, positional []string) (*config, error) {
	if err := l.apply(); err != nil {
		return nil, err
	}
	cfg := &config{host: "localhost", port: 8000, logFile: *v.logFile, user: *v.user,
		printConfig: v.printConfig, configFiles: l.file.paths, projectFile: l.file.project, warnings: l.file.warnings}
	if err := cfg.setLogging(l, v); err != nil {
		return nil, err
	}
	if err := cfg.setFileAddress(l.file); err != nil {
		return nil, err
	}
	if err := cfg.setAddress(positional); err != nil {
		return nil, err
	}
	if err := cfg.setTuning(l, v); err != nil {
		return nil, err
	}
	userinfo, err := cfg.setServer(*v.server)
	if err != nil {
		return nil, err
	}
	if err := cfg.setSecrets(l, v, userinfo); err != nil {
		return nil, err
	}
	cfg.warnings = append(cfg.warnings, otherModesFlags(l, cfg.protocol)...)
	cfg.warnProjectServer(l)
	if err := cfg.checkAuthTransport(v.insecureAuth); err != nil {
		return nil, err
	}
	if *v.caFile != "" {
		if cfg.tls, err = loadCAFile(*v.caFile); err != nil {
			return nil, err
		}
	}
	cfg.setGate(v.origins)
	if err := cfg.setStore(v, l.getenv); err != nil {
		return nil, err
	}
	if cfg.printConfig {
		cfg.shown = describeSettings(l, cfg, positional)
	}
	return cfg, nil
}

// setSecrets takes the user name, the password and the token, each from
// the highest layer that gives it: the command line, the environment, the
// configuration files. The server URI's userinfo (setServer) belongs to
// the layer that gave the server, where --user and --password (or a
// file's user and password) beat it: ELVA_SERVER's userinfo never beats
// --user, nor a file's [basic] secret --server's. A secret comes from its
// flag (--password before --password-file), its environment variable, or
// the files (a value, a file to read, or [basic] command's output, which
// runPasswordCommand gets later, only if nothing above gives the
// password).
func (c *config) setSecrets(l layers, v *flagValues, userinfo *url.Userinfo) error {
	serverLayer, uriFrom := l.layer("server"), "userinfo of the server URI, "+l.where("server")
	c.user, c.userFrom = *v.user, l.where("user")
	if name := userinfo.Username(); name != "" && (c.user == "" || serverLayer < l.layer("user")) {
		c.user, c.userFrom = name, uriFrom
	}
	password, err := l.secret("password", *v.password, *v.passwordFile)
	if err != nil {
		return err
	}
	if pw, ok := userinfo.Password(); ok && pw != "" && (password.empty() || serverLayer < password.layer) {
		password = secretValue{value: pw, from: uriFrom, layer: serverLayer}
	}
	c.password, c.passwordFrom = password.value, password.from
	c.passwordCommand, c.passwordCommandAt = password.command, password.commandAt
	if c.passwordCommand != nil && c.printConfig {
		c.passwordFrom += " " + strconv.Quote(strings.Join(c.passwordCommand, " ")) + ", not run for --print-config"
	}
	if flagSet(l.fs, "password") {
		c.warnings = append(c.warnings, "--password is visible to other users in the process list; use --password-file or ELVA_PASSWORD")
	}
	token, err := l.secret("token", *v.token, *v.tokenFile)
	if err != nil {
		return err
	}
	c.token, c.tokenFrom = token.value, token.from
	if flagSet(l.fs, "token") {
		c.warnings = append(c.warnings, "--token is visible to other users in the process list; use --token-file or ELVA_TOKEN")
	}
	return nil
}

// warnProjectServer warns when the server comes from a project file and
// credentials that file did not give would go to it: a repository may
// bring an elva.toml that sends the user's own password elsewhere.
func (c *config) warnProjectServer(l layers) {
	s, ok := l.file.settings["server"]
	if c.server == nil || !ok || !s.project || l.layer("server") != layerFile {
		return
	}
	fromProject := func(from string) bool { return strings.Contains(from, "file "+c.projectFile+":") }
	var sent []string
	if c.user != "" && !fromProject(c.userFrom) {
		sent = append(sent, "the user name ("+c.userFrom+")")
	}
	if c.password != "" || c.passwordCommand != nil {
		sent = append(sent, "the password ("+c.passwordFrom+")")
	}
	if c.token != "" && c.protocol == protocolHocuspocus {
		sent = append(sent, "the token ("+c.tokenFrom+")")
	}
	if len(sent) > 0 {
		c.warnings = append(c.warnings, fmt.Sprintf("the server %s comes from the project file %s, and credentials it did not give go to it: %s; "+
			"if that server is not yours, remove the file, or give --server or --config", c.server, s.source, strings.Join(sent, ", ")))
	}
}

// setStore takes the store's flags: the data directory (--data-dir, or the
// platform's default), --no-store, --fsync-interval and the tools.
func (c *config) setStore(v *flagValues, getenv func(string) string) error {
	c.noStore, c.fsyncInterval = v.noStore, *v.fsyncInterval
	c.listDocs, c.removeDoc = v.listDocs, *v.removeDoc
	if c.fsyncInterval < 0 {
		return fmt.Errorf("--fsync-interval %v: want 0 (after every update) or more", c.fsyncInterval)
	}
	if c.listDocs && c.removeDoc != "" {
		return errors.New("--list-docs and --remove-doc: give one of them")
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
func (c *config) setTuning(l layers, v *flagValues) error {
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
	switch {
	case l.layer("peer-timeout") != layerDefault: // given: a flag, or a file
	case *v.pingInterval == 0:
		peerTimeout = 0 // without pings a quiet peer is not a dead one
	case peerTimeout < 3**v.pingInterval:
		// The default follows a longer ping interval: three pings.
		peerTimeout = 3 * *v.pingInterval
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
func otherModesFlags(l layers, protocol string) []string {
	var warnings []string
	for _, f := range []struct{ name, mode string }{
		{"token", protocolHocuspocus}, {"token-file", protocolHocuspocus},
		{"id-magic", protocolELVA},
	} {
		// Given on the command line or in a file; an environment
		// variable may be set for other programs too.
		if given := l.layer(f.name); (given == layerFlag || given == layerFile) && protocol != f.mode {
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
// standalone and c.server stays nil. It returns the URI's userinfo, nil
// without one, moved out of c.server so that the URI can be logged; the
// credentials in it are setSecrets's.
func (c *config) setServer(raw string) (*url.Userinfo, error) {
	if raw == "" {
		return nil, nil // standalone: a local Yjs server over the store
	}
	if !strings.Contains(raw, "://") {
		return nil, fmt.Errorf("--server %s: want ws://HOST:PORT/ or wss://HOST/", redactArg(raw))
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("--server: %w", redactURLError(err))
	}
	if u.Scheme != "ws" && u.Scheme != "wss" {
		return nil, fmt.Errorf("--server %s: scheme must be ws or wss", u.Redacted())
	}
	if u.Hostname() == "" {
		return nil, fmt.Errorf("--server %s: no host", u.Redacted())
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("--server %s: bad port %q", u.Redacted(), p)
		}
	}
	userinfo := u.User
	u.User = nil
	if u.Path == "" {
		u.Path = "/"
	}
	if sameAddress(u, c.host, c.port) {
		return nil, fmt.Errorf("remote server address %s is identical to the service address ws://%s", u, net.JoinHostPort(c.host, strconv.Itoa(c.port)))
	}
	c.server = u
	return userinfo, nil
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
	if err != nil {
		return 0, fmt.Errorf("size %q: want a whole number of bytes, KiB or MiB (the units B, K, KiB, M, MiB, as written), e.g. 32MiB or 512KiB", s)
	}
	if n < 1 || n > (1<<30)/unit || n*unit < minMessageLimit {
		return 0, fmt.Errorf("size %q: want 1KiB to 1024MiB, e.g. 32MiB (a bare number is bytes)", s)
	}
	return n * unit, nil
}

// newLogger returns the logger cfg asks for: text or JSON lines
// (--log-format) at cfg.level, to stderr or appended to the --log file,
// which it returns too (nil without one) for SIGHUP and the close.
func newLogger(cfg *config, stderr io.Writer) (*slog.Logger, *logFile, error) {
	w, lf := stderr, (*logFile)(nil)
	if cfg.logFile != "" {
		var err error
		if lf, err = openLogFile(cfg.logFile); err != nil {
			return nil, nil, err
		}
		w = lf
	}
	opts := &slog.HandlerOptions{Level: cfg.level}
	if cfg.logFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts)), lf, nil
	}
	return slog.New(slog.NewTextHandler(w, opts)), lf, nil
}

// logFile is the --log file, appended to. reopen opens its path anew and
// swaps the new file in, so that logrotate can move the old one away
// (SIGHUP). Writers and reopen share only the atomic pointer.
type logFile struct {
	path string                  // absolute; static after construction
	f    atomic.Pointer[os.File] // swapped by reopen
}

// openLogFile opens path for appending, created readable by its owner
// only: the log names documents and remote addresses.
func openLogFile(path string) (*logFile, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("--log: %w", err)
	}
	l := &logFile{path: abs}
	f, err := l.open()
	if err != nil {
		return nil, err
	}
	l.f.Store(f)
	return l, nil
}

// open opens l.path for appending.
func (l *logFile) open() (*os.File, error) {
	// Its folder too, such as ~/.local/state/elva-service: as the data
	// directory's.
	if err := os.MkdirAll(filepath.Dir(l.path), 0o700); err != nil {
		return nil, fmt.Errorf("--log: %w", err)
	}
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("--log: %w", err)
	}
	return f, nil
}

// Write appends p to the current file. A write that finds its file just
// closed by reopen is made again on the new one: no line is lost. An
// *os.File writes all of p or, once closed, nothing.
func (l *logFile) Write(p []byte) (int, error) {
	for {
		f := l.f.Load()
		n, err := f.Write(p)
		if errors.Is(err, os.ErrClosed) && l.f.Load() != f {
			continue
		}
		return n, err
	}
}

// reopen opens the path anew, swaps the new file in and closes the old
// one. If the path cannot be opened, the old file stays in use.
func (l *logFile) reopen() error {
	f, err := l.open()
	if err != nil {
		return err
	}
	return l.f.Swap(f).Close()
}

// Close closes the current file.
func (l *logFile) Close() error { return l.f.Load().Close() }

// reopenOnHangup re-opens lf at each SIGHUP, which logrotate's postrotate
// (or systemctl reload) sends, until the returned stop is called; stop
// returns once the signal goroutine has; it may be called again. With lf
// nil (logs on stderr) a SIGHUP is logged and otherwise ignored.
func reopenOnHangup(lf *logFile, log *slog.Logger) (stop func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	done, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		for {
			select {
			case <-hup:
				if lf == nil {
					log.Info("SIGHUP ignored: logs go to stderr, there is no --log file to reopen")
					continue
				}
				if err := lf.reopen(); err != nil {
					log.Error("cannot reopen the log file; logging on to the old one", "err", err)
					continue
				}
				log.Info("log file reopened", "path", lf.path)
			case <-done:
				return
			}
		}
	}()
	return sync.OnceFunc(func() {
		signal.Stop(hup)
		close(done)
		<-exited
	})
}

// setLogging takes the log's level: -v (debug) or --quiet (warn) from
// the command line, else a configuration file's level, else info; and
// its format (--log-format). The flags count by their value: -v=false is
// as if -v were not given.
func (c *config) setLogging(l layers, v *flagValues) error {
	verbose, quiet := v.verbose, v.quiet
	c.level, c.levelFrom = slog.LevelInfo, "default"
	fileLevel, inFile := l.file.settings["level"]
	switch {
	case verbose && quiet:
		return errors.New("-v and --quiet contradict each other: give one of them")
	case verbose:
		c.level, c.levelFrom = slog.LevelDebug, "flag -v"
	case quiet:
		c.level, c.levelFrom = slog.LevelWarn, "flag --quiet"
	case inFile:
		if err := c.level.UnmarshalText([]byte(fileLevel.values[0])); err != nil {
			return fmt.Errorf("%s: %w", fileLevel.source, err)
		}
		c.levelFrom = "file " + fileLevel.source
	}
	switch *v.logFormat {
	case "text", "json":
		c.logFormat = *v.logFormat
	default:
		return fmt.Errorf("--log-format %q: want text or json", *v.logFormat)
	}
	return nil
}

// setFileAddress takes HOST and PORT from the configuration files; the
// positional arguments override them.
func (c *config) setFileAddress(fc *fileConfig) error {
	if s, ok := fc.settings["host"]; ok {
		host, err := checkHost(s.values[0])
		if err != nil {
			return fmt.Errorf("%s: %w", s.source, err)
		}
		c.host = host
	}
	if s, ok := fc.settings["port"]; ok {
		port, err := strconv.Atoi(s.values[0])
		if err != nil || port < 0 || port > 65535 {
			return fmt.Errorf("%s: port %s: want a number from 0 to 65535", s.source, s.values[0])
		}
		c.port = port
	}
	return nil
}

// envOf names the environment variable of each flag that has one (see
// defineFlags): it beats a configuration file, and the flag beats it.
var envOf = map[string]string{
	"server": "ELVA_SERVER", "user": "ELVA_USER", "password": "ELVA_PASSWORD",
	"protocol": "ELVA_PROTOCOL", "token": "ELVA_TOKEN", "data-dir": "ELVA_DATA_DIR",
	"upstream-max-message": "ELVA_UPSTREAM_MAX_MESSAGE",
}

// layers is where settings come from, highest first: the command line
// (fs), the environment (getenv), the configuration files (file); below
// them, the built-in defaults.
type layers struct {
	fs     *flag.FlagSet
	getenv func(string) string
	file   *fileConfig
	kinds  map[string]settingKind // the flags a file may set, by long name
}

// layer is where a setting got its value; the lower wins.
type layer int

const (
	layerFlag    layer = iota // the command line
	layerEnv                  // an ELVA_* environment variable
	layerFile                 // a configuration file
	layerDefault              // none of them: the built-in default
)

// layer tells which layer gave the setting name its value.
func (l layers) layer(name string) layer {
	switch env := envOf[name]; {
	case flagSet(l.fs, name):
		return layerFlag
	case env != "" && l.getenv(env) != "":
		return layerEnv
	}
	if _, ok := l.file.settings[name]; ok {
		return layerFile
	}
	return layerDefault
}

// where tells where the setting name got its value: "flag --name", "env
// NAME", "file PATH:LINE ([table] key)" or "default".
func (l layers) where(name string) string {
	switch l.layer(name) {
	case layerFlag:
		return "flag --" + name
	case layerEnv:
		return "env " + envOf[name]
	case layerFile:
		return "file " + l.file.settings[name].source
	}
	return "default"
}

// apply gives each flag that a configuration file sets the file's value,
// unless the command line or the flag's environment variable set it. The
// password and the token are secret's; host, port and level have setters
// of their own.
func (l layers) apply() error {
	for _, name := range slices.Sorted(maps.Keys(l.file.settings)) {
		f := l.fs.Lookup(name)
		if f == nil || name == "password" || name == "token" || !strings.HasPrefix(l.where(name), "file ") {
			continue
		}
		s := l.file.settings[name]
		for _, value := range s.values {
			if err := f.Value.Set(value); err != nil {
				return fmt.Errorf("%s: %q: %w", s.source, value, err)
			}
		}
	}
	return nil
}

// secretValue is the password or the token, where it came from, and the
// layer that gave it.
type secretValue struct {
	value string
	from  string // "flag --password", "file PATH:LINE ([basic] secret)", …
	layer layer
	// command is a file's [basic] command, whose output's first line is
	// the password, and commandAt where the file gave it; value is ""
	// until it has run.
	command   []string
	commandAt string
}

// empty reports whether s gives no secret: neither a value nor a command.
func (s secretValue) empty() bool { return s.value == "" && s.command == nil }

// secret returns the password or the token (name): --name, else
// --name-file, else its environment variable (value is the flag's, whose
// default that is), else what the configuration files give: a value, a
// file to read, or a command, which it does not run.
func (l layers) secret(name, value, path string) (secretValue, error) {
	switch {
	case flagSet(l.fs, name):
		return secretValue{value: value, from: "flag --" + name, layer: layerFlag}, nil
	case flagSet(l.fs, name+"-file"):
		s, err := readSecretFile("--"+name+"-file", path)
		return secretValue{value: s, from: "flag --" + name + "-file " + path, layer: layerFlag}, err
	case value != "":
		return secretValue{value: value, from: "env " + envOf[name], layer: layerEnv}, nil
	}
	s, ok := l.file.settings[name]
	switch {
	case !ok:
		return secretValue{from: "default", layer: layerDefault}, nil
	case s.form == formFile:
		secret, err := readSecretFile(s.source, s.values[0])
		return secretValue{value: secret, from: "file " + s.source + " " + s.values[0], layer: layerFile}, err
	case s.form == formCommand:
		return secretValue{from: "file " + s.source, layer: layerFile, command: s.values, commandAt: s.source}, nil
	}
	return secretValue{value: s.values[0], from: "file " + s.source, layer: layerFile}, nil
}

// hint adds to an error that names a flag whose value a configuration
// file gave the file and line it came from.
func (l layers) hint(err error) error {
	if err == nil {
		return nil
	}
	for _, name := range slices.Sorted(maps.Keys(l.file.settings)) {
		if mentionsFlag(err.Error(), name) && strings.HasPrefix(l.where(name), "file ") {
			return fmt.Errorf("%w (--%s is set in %s)", err, name, l.file.settings[name].source)
		}
	}
	return err
}

// mentionsFlag reports whether msg names --name itself, not a longer flag
// that begins with it (--log, --log-format).
func mentionsFlag(msg, name string) bool {
	for i := 0; ; {
		j := strings.Index(msg[i:], "--"+name)
		if j < 0 {
			return false
		}
		end := i + j + 2 + len(name)
		if end == len(msg) || !(msg[end] == '-' || 'a' <= msg[end] && msg[end] <= 'z') {
			return true
		}
		i = end
	}
}

// shownSetting is one line of --print-config: a setting as TOML, and
// where its value came from.
type shownSetting struct{ name, value, source string }

// describeSettings lists the effective settings for --print-config: host
// and port, then every flag a file may set, by its long name, with the
// password and the token redacted.
func describeSettings(l layers, cfg *config, positional []string) []shownSetting {
	hostFrom, portFrom := l.where("host"), l.where("port")
	if len(positional) > 0 {
		hostFrom = "argument HOST"
	}
	if len(positional) > 1 {
		portFrom = "argument PORT"
	}
	shown := []shownSetting{{"host", strconv.Quote(cfg.host), hostFrom}, {"port", strconv.Itoa(cfg.port), portFrom}}
	l.fs.VisitAll(func(f *flag.Flag) {
		kind, ok := l.kinds[f.Name]
		if !ok {
			return
		}
		s := shownSetting{f.Name, tomlLiteral(f.Value.String(), kind), l.where(f.Name)}
		switch f.Name {
		case "user":
			s.value, s.source = strconv.Quote(cfg.user), cfg.userFrom
		case "password":
			s.value, s.source = redacted(cfg.password, cfg.passwordFrom), cfg.passwordFrom
		case "token":
			s.value, s.source = redacted(cfg.token, cfg.tokenFrom), cfg.tokenFrom
		case "server":
			s.value = strconv.Quote(redactArg(f.Value.String()))
		case "data-dir":
			s.value = strconv.Quote(cfg.dataDir) // the platform's default, if not given
		case "verbose":
			s.value, s.source = strconv.FormatBool(cfg.level <= slog.LevelDebug), cfg.levelFrom
		case "quiet":
			s.value, s.source = strconv.FormatBool(cfg.level >= slog.LevelWarn), cfg.levelFrom
		case "peer-timeout":
			if t := cfg.keepalive.timeout; tomlLiteral(t.String(), kind) != s.value {
				// Derived from the ping interval (none, or a longer one).
				s.value, s.source = strconv.Quote(t.String()), "follows ping-interval ("+s.source+" is overridden)"
			}
		}
		shown = append(shown, s)
	})
	return shown
}

// redacted stands for a secret in --print-config: empty only if there is
// none.
func redacted(secret, from string) string {
	if secret == "" && from == "default" {
		return `""`
	}
	return strconv.Quote(redactedValue)
}

// redactedValue stands for a secret in --print-config.
const redactedValue = "[redacted]"

// tomlLiteral writes a flag's value as TOML: bare for a boolean or a
// whole number, an array for --allow-origin, else a quoted string.
func tomlLiteral(value string, kind settingKind) string {
	switch kind {
	case kindBool, kindInt:
		return value
	case kindList:
		var quoted []string
		for _, v := range strings.Split(value, ",") {
			if v != "" {
				quoted = append(quoted, strconv.Quote(v))
			}
		}
		return "[" + strings.Join(quoted, ", ") + "]"
	}
	return strconv.Quote(value)
}

// printConfig writes cfg's effective settings as a [service] table, each
// line with where its value came from, after the files read and the
// warnings the start would log (--print-config).
func printConfig(w io.Writer, cfg *config) {
	fmt.Fprintln(w, "# elva-service: the effective settings, each with where it came from")
	if len(cfg.configFiles) == 0 {
		fmt.Fprintln(w, "# configuration files: none")
	} else {
		fmt.Fprintln(w, "# configuration files, the later winning:", strings.Join(cfg.configFiles, ", "))
	}
	for _, warning := range cfg.warnings {
		fmt.Fprintln(w, "# warning:", warning)
	}
	fmt.Fprintln(w, "[service]")
	for _, s := range cfg.shown {
		fmt.Fprintf(w, "%-46s # %s\n", s.name+" = "+s.value, s.source)
	}
}

// logConfigFiles logs which configuration files the relay read, at the
// start: a file found in the directory tree may change it unnoticed.
func logConfigFiles(log *slog.Logger, cfg *config) {
	for _, path := range cfg.configFiles {
		log.Info("configuration file read", "path", path, "project", path == cfg.projectFile)
	}
}

// configName is the configuration file's name, ELVA's (src/elva/cli.py,
// CONFIG_NAME).
const configName = "elva.toml"

// settingKind is the type of value a setting takes in a file.
type settingKind int

const (
	kindString  settingKind = iota
	kindBool                // true or false
	kindInt                 // a whole number
	kindSize                // a string such as "32MiB", or a number of bytes
	kindList                // an array of strings, or one string
	kindLevel               // a level name, or a Python logging level number
	kindCommand             // an array of strings, or one string without shell syntax
)

// kindWants is the error for a value of the wrong type, by kind.
var kindWants = map[settingKind]string{
	kindString:  "want a string in quotes",
	kindBool:    "want true or false",
	kindInt:     "want a whole number",
	kindSize:    `want a size such as "32MiB", or a number of bytes`,
	kindList:    "want an array of strings, or one string",
	kindLevel:   `want "DEBUG", "INFO", "WARNING", "ERROR" or "CRITICAL", or 10 to 50`,
	kindCommand: `want the command's words as an array, e.g. ["pass", "show", "elva"]`,
}

// flagKinds are the kinds of the flags that take other than a string or a
// boolean.
var flagKinds = map[string]settingKind{
	"max-connections": kindInt, "max-per-document": kindInt,
	"max-message": kindSize, "upstream-max-message": kindSize,
	"allow-origin": kindList,
}

// notSettings are the flags that ask for an action: they have no place in
// a file.
var notSettings = map[string]bool{"config": true, "print-config": true, "version": true, "list-docs": true, "remove-doc": true}

// otherKinds are the settings a file may give besides the flags: where to
// listen, the log level, and [connect]'s parts of the server URI.
var otherKinds = map[string]settingKind{
	"host": kindString, "port": kindInt, "level": kindLevel,
	"connect.host": kindString, "connect.port": kindInt, "connect.path": kindString, "connect.secure": kindBool,
}

// settingKinds returns the kind of every flag a file may set, by its long
// name.
func settingKinds(fs *flag.FlagSet) map[string]settingKind {
	kinds := make(map[string]settingKind)
	fs.VisitAll(func(f *flag.Flag) {
		if len(f.Name) < 2 || notSettings[f.Name] {
			return
		}
		kind, ok := flagKinds[f.Name]
		if b, isBool := f.Value.(interface{ IsBoolFlag() bool }); !ok && isBool && b.IsBoolFlag() {
			kind = kindBool
		}
		kinds[f.Name] = kind
	})
	return kinds
}

// secretForm is how a file gives the password or the token.
type secretForm int

const (
	formValue   secretForm = iota // the value itself (and any other setting)
	formFile                      // a file whose first line it is (password-file, token-file)
	formCommand                   // a command whose output's first line it is ([basic] command)
)

// fileSetting is one setting a configuration file gives, in the form its
// flag takes.
type fileSetting struct {
	values  []string   // one; one per origin for allow-origin; argv for a command
	source  string     // PATH:LINE ([table] key)
	form    secretForm // for the password and the token
	project bool       // given by a project file
}

// fileConfig is what the configuration files give. Static once read.
type fileConfig struct {
	paths    []string               // the files read, the later winning
	project  string                 // the project file among them; "" if none
	settings map[string]fileSetting // by flag long name, or otherKinds' names
	warnings []string               // logged once the logger exists
}

// readConfigFiles reads the configuration files (configFiles) into one
// fileConfig, each file over those before it.
func readConfigFiles(explicit, dir string, getenv func(string) string, kinds map[string]settingKind) (*fileConfig, error) {
	paths, err := configFiles(explicit, dir, getenv)
	if err != nil {
		return nil, err
	}
	fc := &fileConfig{settings: make(map[string]fileSetting)}
	for i, path := range paths {
		// The file found in the directory tree may be anyone's (a cloned
		// repository's): not the user's own.
		project := explicit == "" && i == len(paths)-1 && path != userConfigFile(getenv)
		err := fc.read(path, kinds, project)
		if errors.Is(err, errUnsafeProject) {
			fc.warnings = append(fc.warnings, err.Error())
			continue
		}
		if err != nil {
			return nil, err
		}
	}
	return fc, nil
}

// configFiles returns the configuration files to read, the later
// winning: with --config, that file (or elva.toml in that directory)
// alone; else the user's (userConfigFile), then the first elva.toml in dir
// or one of its parents (the project's): the two that ELVA reads
// (src/elva/cli.py, find_config_path and USER_HOME_CONFIG).
func configFiles(explicit, dir string, getenv func(string) string) ([]string, error) {
	if explicit != "" {
		if info, err := os.Stat(explicit); err != nil {
			return nil, fmt.Errorf("--config: %w", err)
		} else if info.IsDir() {
			explicit = filepath.Join(explicit, configName)
		}
		return []string{explicit}, nil
	}
	var paths []string
	if user := userConfigFile(getenv); user != "" && isRegularFile(user) {
		paths = append(paths, user)
	}
	for d := dir; d != ""; d = filepath.Dir(d) {
		if p := filepath.Join(d, configName); isRegularFile(p) {
			if len(paths) == 0 || paths[0] != p {
				paths = append(paths, p)
			}
			break
		}
		if filepath.Dir(d) == d {
			break
		}
	}
	return paths, nil
}

// userConfigFile is the user's ELVA configuration file, where ELVA's
// platformdirs.user_config_dir puts it: $XDG_CONFIG_HOME/elva/elva.toml,
// ~/.config/elva/elva.toml without it, on macOS ~/Library/Application
// Support/elva/elva.toml; "" without a home.
func userConfigFile(getenv func(string) string) string {
	dir := userDir(getenv, "XDG_CONFIG_HOME", ".config", "elva")
	if dir == "" {
		return ""
	}
	return filepath.Join(dir, configName)
}

// isRegularFile reports whether path is a file, not a directory.
func isRegularFile(path string) bool {
	info, err := os.Stat(path)
	return err == nil && info.Mode().IsRegular()
}

// maxConfigBytes bounds a configuration file: ELVA's are a few lines.
const maxConfigBytes = 1 << 20

// read adds the settings of the file at path over those read before. A
// project file, the one found in the directory tree, may give only some
// settings (projectRefusal).
func (fc *fileConfig) read(path string, kinds map[string]settingKind, project bool) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("configuration file: %w", err)
	}
	defer f.Close()
	if project {
		if err := checkProjectFile(f, os.Getuid()); err != nil {
			return fmt.Errorf("project file %s skipped: %w", path, err)
		}
	}
	data, err := io.ReadAll(io.LimitReader(f, maxConfigBytes+1))
	if err != nil {
		return fmt.Errorf("configuration file %s: %w", path, err)
	} else if len(data) > maxConfigBytes {
		return fmt.Errorf("configuration file %s: larger than %d bytes", path, maxConfigBytes)
	}
	// The top level ("") is read too, to warn of a key there.
	entries, err := parseTOML(path, string(data), func(table string) bool { return table == "" || slices.Contains(configTables, table) })
	if err != nil {
		return err
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("configuration file %s: %w", path, err)
	}
	r := &fileReader{fc: fc, path: path, dir: filepath.Dir(abs), kinds: kinds, project: project, connect: make(map[string]tomlEntry)}
	if err := r.take(entries); err != nil {
		return err
	}
	fc.paths = append(fc.paths, path)
	if project {
		fc.project = path
	}
	if info, err := f.Stat(); err == nil && r.secret && info.Mode().Perm()&0o077 != 0 {
		fc.warnings = append(fc.warnings, fmt.Sprintf("configuration file %s holds a password or token and others may read it (mode %#o): chmod 600 it", path, info.Mode().Perm()))
	}
	return nil
}

// errUnsafeProject is why a project file is skipped: someone else than
// the user could have written it, as git refuses a repository another
// user owns (safe.directory).
var errUnsafeProject = errors.New("a project file is read only if no one but you could have written it")

// checkProjectFile returns errUnsafeProject, with what is wrong, unless
// the user uid owns the open file f and no one else may write to it. On
// Windows it checks nothing: its files have neither the owner nor the
// mode bits this checks.
func checkProjectFile(f *os.File, uid int) error {
	if runtime.GOOS == "windows" {
		return nil
	}
	info, err := f.Stat()
	if err != nil {
		return fmt.Errorf("%w: %v", errUnsafeProject, err)
	}
	if owner, ok := fileOwner(info); ok && owner != uid {
		return fmt.Errorf("it belongs to user %d, not to you (user %d); %w", owner, uid, errUnsafeProject)
	}
	if perm := info.Mode().Perm(); perm&0o022 != 0 {
		return fmt.Errorf("others may change it (mode %#o; chmod go-w it if it is yours); %w", perm, errUnsafeProject)
	}
	return nil
}

// fileOwner is the user id of info's owner: the Uid field of what Sys
// gives (syscall.Stat_t on Unix). Read by reflection, because Windows has
// no syscall.Stat_t and this package keeps no file per system; ok is
// false where there is no such field.
func fileOwner(info os.FileInfo) (uid int, ok bool) {
	v := reflect.ValueOf(info.Sys())
	if v.Kind() == reflect.Pointer {
		v = v.Elem()
	}
	if v.Kind() != reflect.Struct {
		return 0, false
	}
	if f := v.FieldByName("Uid"); f.IsValid() && f.CanUint() {
		return int(f.Uint()), true
	}
	return 0, false
}

// configTables are the tables read, in the order they apply, a later
// one's setting winning: the seed's [app.default] and [app.service] (its
// src/elva/utils.py, gather_context_information), current ELVA's
// [connect], [basic], [tls] and [log], then this relay's own [service].
// Other tables belong to other ELVA apps: ignored.
var configTables = []string{"app.default", "app.service", "connect", "basic", "tls", "log", "service"}

// seedKeys map the keys of the seed's [app.*] tables that the relay uses
// (its src/elva/apps/service.py) onto its settings.
var seedKeys = map[string]string{"server": "server", "user": "user", "password": "password", "host": "host", "port": "port", "log": "log", "level": "level"}

// elvaKeys map the keys of ELVA's tables onto the relay's settings; the
// tables' other keys are other ELVA apps': ignored.
var elvaKeys = map[string]map[string]string{
	"app.default": seedKeys,
	"app.service": seedKeys,
	"connect":     {"host": "connect.host", "port": "connect.port", "path": "connect.path", "secure": "connect.secure"},
	"basic":       {"user": "user", "secret": "password", "command": "password"},
	"tls":         {"cafile": "ca-file", "ca-file": "ca-file"},
	"log":         {"file": "log", "level": "level"},
}

// fileReader maps one file's entries onto its fileConfig.
type fileReader struct {
	fc      *fileConfig
	path    string
	dir     string // the file's directory, absolute: relative paths in it start there
	kinds   map[string]settingKind
	project bool                 // a project file: it may give projectSettings only
	connect map[string]tomlEntry // [connect]'s keys, for the server URI
	levelBy string               // the [service] key (verbose, quiet) that set the level
	secret  bool                 // the file holds a password, secret or token
}

// take maps the entries table by table, in configTables' order.
func (r *fileReader) take(entries []tomlEntry) error {
	for _, table := range append([]string{""}, configTables...) {
		for _, e := range entries {
			if e.table != table {
				continue
			}
			if err := r.takeEntry(e); err != nil {
				return fmt.Errorf("%s:%d: [%s] %s: %w", r.path, e.line, e.table, e.key, err)
			}
		}
		if table == "connect" {
			if err := r.connectServer(); err != nil {
				return err
			}
		}
	}
	return nil
}

// takeEntry maps one entry onto its setting.
func (r *fileReader) takeEntry(e tomlEntry) error {
	if e.table == "" {
		// ELVA reads no key outside a table either; a user who wrote one
		// meant a setting, most likely [service]'s.
		r.fc.warnings = append(r.fc.warnings, fmt.Sprintf("%s:%d: %s is outside any table and ignored; settings of this relay go under [service]", r.path, e.line, e.key))
		return nil
	}
	name, err := r.settingOf(e)
	if name == "" || err != nil {
		return err
	}
	kind, ok := r.kinds[name]
	if !ok {
		kind = otherKinds[name]
	}
	form := formValue
	switch {
	case e.table == "basic" && e.key == "command":
		kind, form = kindCommand, formCommand
	case e.key == "password-file" || e.key == "token-file":
		name, form = strings.TrimSuffix(name, "-file"), formFile
	}
	if e.val.kind == tomlString && e.val.str == "" && (form == formFile || pathSettings[name]) {
		return nil // an empty path is no path: as --print-config writes an unset one
	}
	if e.val.kind == tomlString && e.val.str == redactedValue && (name == "password" || name == "token") {
		return fmt.Errorf("%q is the placeholder --print-config writes for a secret: put the secret itself, or remove the line", redactedValue)
	}
	values, err := settingValues(e.val, kind)
	if err != nil {
		return err
	}
	if r.project {
		if why := projectRefusal(name, form, values); why != "" {
			return fmt.Errorf("refused from a project file (one found in the directory tree, which may be anyone's: a cloned repository's, or another user's in /tmp): %s; "+
				"put it in your own elva.toml (%s), in a file given with --config, or on the command line", why, userConfigHint())
		}
	}
	if form == formFile || pathSettings[name] {
		values[0] = r.resolve(values[0])
	}
	s := fileSetting{values: values, source: fmt.Sprintf("%s:%d ([%s] %s)", r.path, e.line, e.table, e.key), form: form, project: r.project}
	switch {
	case strings.HasPrefix(name, "connect."):
		r.connect[strings.TrimPrefix(name, "connect.")] = e
		return nil
	case name == "verbose" || name == "quiet":
		return r.takeLevelFlag(e.key, values[0] == "true", s)
	}
	r.secret = r.secret || (name == "password" || name == "token") && form == formValue
	r.fc.settings[name] = s
	return nil
}

// projectSettings are the settings a project file may give: the server
// and how to talk to it, the user name, the limits and timeouts, the log's
// level and format, the port. The others choose what the relay exposes,
// whom it trusts, where it writes, or are secrets: a file that came with
// a repository, or that another user put in /tmp, must not choose them.
var projectSettings = map[string]bool{
	"server": true, "connect.host": true, "connect.port": true, "connect.path": true, "connect.secure": true,
	"protocol": true, "id-magic": true, "user": true,
	"max-message": true, "upstream-max-message": true, "max-connections": true, "max-per-document": true,
	"ping-interval": true, "peer-timeout": true, "retry-max": true, "upstream-grace": true, "fsync-interval": true,
	"level": true, "verbose": true, "quiet": true, "log-format": true, "port": true,
}

// projectRisks says, for the settings a project file may not give, what
// it could do with them.
var projectRisks = map[string]string{
	"host":                "it would choose the address the relay listens on, and one other than loopback lets the network read and change your documents",
	"allow-origin":        "it would let web pages read and change your documents",
	"allow-insecure-auth": "it would have your credentials sent in clear text",
	"ca-file":             "it would choose whom the relay trusts to be the server",
	"data-dir":            "it would choose where your documents are kept",
	"no-store":            "it would keep your documents off the disk",
	"log":                 "it would choose a file for the relay to write to",
	"password":            "it is a secret, which belongs in your own file",
	"token":               "it is a secret, which belongs in your own file",
}

// userConfigHint names the user's file, as userConfigFile finds it, for
// an error message.
func userConfigHint() string {
	if runtime.GOOS == "darwin" {
		return "~/Library/Application Support/elva/elva.toml"
	}
	return "$XDG_CONFIG_HOME/elva/elva.toml, by default ~/.config/elva/elva.toml"
}

// projectRefusal says why a project file may not give the setting name in
// form with values, or "" if it may.
func projectRefusal(name string, form secretForm, values []string) string {
	switch {
	case form == formCommand:
		return "it would run a command"
	case form == formFile:
		return "it would have the relay read a secret from a file it names"
	case name == "server" && hasPassword(values[0]):
		return "a password in the server URI is a secret, which belongs in your own file"
	case projectSettings[name]:
		return ""
	}
	if why, ok := projectRisks[name]; ok {
		return why
	}
	return "a project file may give only server ([connect]), protocol, id-magic, user, the limits and timeouts, fsync-interval, the log's level and format, and port"
}

// hasPassword reports whether the URI raw holds a password in its
// userinfo.
func hasPassword(raw string) bool {
	u, err := url.Parse(raw)
	if err != nil {
		return strings.Contains(raw, "@") // unparsable: it may hold one
	}
	_, ok := u.User.Password()
	return ok
}

// pathSettings are the settings besides password-file and token-file
// whose value is a path.
var pathSettings = map[string]bool{"ca-file": true, "log": true, "data-dir": true}

// resolve gives a path a file names as it means it: a relative one starts
// in the file's directory, as in the files of git and ssh, not in whatever
// directory the relay runs in. "" stays "" (no file).
func (r *fileReader) resolve(path string) string {
	if path == "" || filepath.IsAbs(path) {
		return path
	}
	return filepath.Join(r.dir, path)
}

// settingOf names the setting of an entry: a flag's long name, host or
// port in [service], where any other key is an error; otherwise what
// elvaKeys says, or "" for another ELVA app's key.
func (r *fileReader) settingOf(e tomlEntry) (string, error) {
	if e.table != "service" {
		return elvaKeys[e.table][e.key], nil
	}
	switch alt := strings.ToLower(strings.ReplaceAll(e.key, "_", "-")); {
	case flagOrAddress(r.kinds, e.key):
		return e.key, nil
	case notSettings[e.key]:
		return "", fmt.Errorf("--%s is a command-line action, not a setting", e.key)
	case flagOrAddress(r.kinds, alt):
		return "", fmt.Errorf("no such setting; did you mean %s?", alt)
	}
	return "", errors.New("no such setting: [service] takes host, port and the flags by their long names, as --help lists them")
}

// flagOrAddress reports whether key names a setting of [service].
func flagOrAddress(kinds map[string]settingKind, key string) bool {
	_, ok := kinds[key]
	return ok || key == "host" || key == "port"
}

// takeLevelFlag takes [service] verbose or quiet: true sets the level
// (debug, warn), false leaves it; both true contradict each other.
func (r *fileReader) takeLevelFlag(key string, on bool, s fileSetting) error {
	if !on {
		return nil
	}
	if r.levelBy != "" {
		return fmt.Errorf("%s = true and %s = true contradict each other", r.levelBy, key)
	}
	r.levelBy = key
	s.values = []string{"DEBUG"}
	if key == "quiet" {
		s.values = []string{"WARN"}
	}
	r.fc.settings["level"] = s
	return nil
}

// connectServer builds the server URI from ELVA's [connect]: ws://, or
// wss:// with secure = true, then host, port and path.
func (r *fileReader) connectServer() error {
	host, ok := r.connect["host"]
	if !ok {
		for _, key := range []string{"port", "path", "secure"} {
			if e, ok := r.connect[key]; ok {
				return fmt.Errorf("%s:%d: [connect] %s without host", r.path, e.line, key)
			}
		}
		return nil
	}
	h := host.val.str
	if h == "" || strings.ContainsAny(h, "/@[] ") {
		return fmt.Errorf("%s:%d: [connect] host %q: want a host name or address only (a URI goes in [service] server)", r.path, host.line, h)
	}
	u := url.URL{Scheme: "ws", Host: h, Path: "/"}
	if strings.Contains(h, ":") {
		u.Host = "[" + h + "]"
	}
	if e, ok := r.connect["secure"]; ok && e.val.flag {
		u.Scheme = "wss"
	}
	if e, ok := r.connect["port"]; ok {
		u.Host = net.JoinHostPort(h, strconv.FormatInt(e.val.num, 10))
	}
	if e, ok := r.connect["path"]; ok {
		u.Path = "/" + strings.TrimPrefix(e.val.str, "/")
	}
	r.fc.settings["server"] = fileSetting{values: []string{u.String()}, source: fmt.Sprintf("%s:%d ([connect] host)", r.path, host.line), project: r.project}
	return nil
}

// settingValues checks a value against its setting's kind and returns it
// in the form the flag takes: one string, or several for a list or a
// command.
func settingValues(v tomlValue, kind settingKind) ([]string, error) {
	switch {
	case kind == kindLevel:
		return levelName(v)
	case kind == kindCommand && v.kind == tomlString:
		return splitCommand(v.str)
	case v.kind == tomlString && (kind == kindString || kind == kindSize || kind == kindList):
		return []string{v.str}, nil
	case v.kind == tomlInt && (kind == kindInt || kind == kindSize):
		return []string{strconv.FormatInt(v.num, 10)}, nil
	case v.kind == tomlBool && kind == kindBool:
		return []string{strconv.FormatBool(v.flag)}, nil
	case v.kind == tomlStrings && kind == kindList:
		return v.list, nil
	case v.kind == tomlStrings && kind == kindCommand && len(v.list) > 0 && v.list[0] != "":
		return v.list, nil
	}
	return nil, errors.New(kindWants[kind])
}

// levelName gives the slog name of a file's log level: a name as
// Python's logging has them (DEBUG, INFO, WARNING, ERROR, CRITICAL; WARN)
// or a Python logging level number, which the seed's level is (10 debug,
// 20 info, 30 warning, 40 error, 50 critical). CRITICAL is slog's ERROR.
func levelName(v tomlValue) ([]string, error) {
	n := v.num
	switch {
	case v.kind == tomlString:
		n = map[string]int64{"DEBUG": 10, "INFO": 20, "WARNING": 30, "WARN": 30, "ERROR": 40, "CRITICAL": 50}[strings.ToUpper(v.str)]
	case v.kind != tomlInt:
		n = 0
	}
	switch {
	case n < 1 || n > 50:
		return nil, errors.New(kindWants[kindLevel])
	case n <= 10:
		return []string{"DEBUG"}, nil
	case n <= 20:
		return []string{"INFO"}, nil
	case n <= 30:
		return []string{"WARN"}, nil
	}
	return []string{"ERROR"}, nil
}

// splitCommand splits a [basic] command given as one string at its
// spaces. It runs without a shell, to which quotes, pipes, variables and
// the like would mean something: such a string is refused, with the
// array form as the way out.
func splitCommand(s string) ([]string, error) {
	if strings.ContainsAny(s, "\"'\\|&;<>()$`*?[]{}~#\n") {
		return nil, errors.New(`the command needs a shell as written; give its words as an array, e.g. ["sh", "-c", "pass show elva | head -n 1"]`)
	}
	words := strings.Fields(s)
	if len(words) == 0 {
		return nil, errors.New("the command is empty")
	}
	return words, nil
}

// runPasswordCommand runs the file's [basic] command for the password if
// the password is to come from it and there is a server to send it to;
// run calls it once the relay is to start, so that --print-config, the
// store's tools and a relay without a server never run it. An error (the
// command failed, or did not answer in time) is a failure at run time.
func (c *config) runPasswordCommand() error {
	if c.passwordCommand == nil || c.server == nil {
		return nil
	}
	password, err := runSecretCommand(c.passwordCommand, c.passwordCommandAt)
	if err != nil {
		return err
	}
	c.password = password
	return nil
}

// secretCommandTimeout bounds a [basic] command: a password manager that
// asks for its own passphrase gets this long. A variable for one test.
var secretCommandTimeout = 10 * time.Second

// secretCommandWaitDelay is how long a [basic] command's pipes may stay
// open after it was killed at its timeout, or after it exited: a process
// it started in the background may hold them, and is not waited for.
const secretCommandWaitDelay = time.Second

// runSecretCommand runs argv, the [basic] command given at source,
// without a shell and without input, and returns the first line of its
// output: the password. A failure, a timeout or an empty first line is an
// error that names the command and shows its stderr's first line, never
// its output. At the timeout the command itself is killed; processes it
// started are not (that would take a process group, which Windows lacks),
// and their hold on its pipes ends after secretCommandWaitDelay.
func runSecretCommand(argv []string, source string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), secretCommandTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.WaitDelay = secretCommandWaitDelay
	out, err := cmd.Output()
	what := fmt.Sprintf("%s: command %q", source, strings.Join(argv, " "))
	switch {
	case ctx.Err() != nil:
		return "", fmt.Errorf("%s: no answer within %v", what, secretCommandTimeout)
	case err != nil:
		line, _, _ := strings.Cut(strings.TrimSpace(stderr.String()), "\n")
		if len(line) > 200 {
			line = line[:200] + "…"
		}
		if line == "" {
			return "", fmt.Errorf("%s: %w (it wrote nothing on stderr)", what, err)
		}
		return "", fmt.Errorf("%s: %w: %s", what, err, line)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	if line = strings.TrimRight(line, "\r"); line == "" {
		return "", fmt.Errorf("%s printed nothing on its first line", what)
	}
	return line, nil
}

// tomlKind is the type of a TOML value this relay reads.
type tomlKind int

const (
	tomlString  tomlKind = iota + 1 // basic "…" or literal '…', on one line
	tomlInt                         // decimal, 64-bit
	tomlBool                        // true, false
	tomlStrings                     // an array of strings
)

// tomlValue is one value of the TOML subset configuration files use.
type tomlValue struct {
	kind tomlKind
	str  string
	num  int64
	flag bool
	list []string
}

// tomlEntry is one key = value line and the table it is in.
type tomlEntry struct {
	table string // the dotted table name; "" before the first table
	key   string
	val   tomlValue
	line  int // 1-based
}

// tomlParser reads the TOML subset ELVA's configuration files use (TOML
// 1.0, toml.io): comments, tables with dotted names, bare keys, basic and
// literal strings, decimal integers, booleans and arrays of strings, which
// may span lines. Anything else TOML has is an error naming the file and
// line, "unsupported TOML", never a misread; what TOML forbids is
// "invalid TOML". In the tables it does not read (other ELVA apps') it
// passes over any value.
type tomlParser struct {
	path  string
	src   string
	reads func(table string) bool // static
	pos   int                     // the next byte of src
	line  int                     // pos's line, 1-based
}

// otherTable names a table the parser does not read: an array of tables
// or one with a quoted name, which this relay's tables never are.
const otherTable = "\x00other"

// parseTOML returns the entries of src, the file at path, in order, of
// the tables reads accepts (the top level is ""). Duplicate keys and
// tables are errors, as TOML has them.
func parseTOML(path, src string, reads func(table string) bool) ([]tomlEntry, error) {
	if !utf8.ValidString(src) {
		bad := len(src) // the first byte that is not UTF-8
		for i, r := range src {
			if r == utf8.RuneError {
				if _, n := utf8.DecodeRuneInString(src[i:]); n == 1 {
					bad = i
					break
				}
			}
		}
		return nil, fmt.Errorf("%s:%d: invalid TOML: not UTF-8", path, 1+strings.Count(src[:bad], "\n"))
	}
	p := &tomlParser{path: path, src: strings.TrimPrefix(src, "\ufeff"), reads: reads, line: 1}
	var entries []tomlEntry
	defined := make(map[string]bool) // tables and keys, by dotted name
	table := ""
	for p.skipBlank(); p.pos < len(p.src); p.skipBlank() {
		if p.src[p.pos] == '[' {
			name, err := p.tableHeader()
			if err != nil {
				return nil, err
			}
			if defined[name] && name != otherTable {
				return nil, p.invalid("[%s] is defined twice", name)
			}
			defined[name], table = true, name
			continue
		}
		if table == otherTable || !reads(table) {
			if err := p.skipKeyValue(); err != nil {
				return nil, err
			}
			continue
		}
		e, err := p.keyValue(table)
		if err != nil {
			return nil, err
		}
		if full := strings.TrimPrefix(table+"."+e.key, "."); defined[full] {
			return nil, fmt.Errorf("%s:%d: invalid TOML: %s is defined twice", path, e.line, full)
		} else {
			defined[full] = true
		}
		entries = append(entries, e)
	}
	return entries, nil
}

// unsupported is the error for a TOML construct this reader does not take.
func (p *tomlParser) unsupported(what string) error {
	return fmt.Errorf("%s:%d: unsupported TOML: %s", p.path, p.line, what)
}

// invalid is the error for what TOML does not allow.
func (p *tomlParser) invalid(format string, args ...any) error {
	return fmt.Errorf("%s:%d: invalid TOML: %s", p.path, p.line, fmt.Sprintf(format, args...))
}

// peek is the next byte, or 0 at the end.
func (p *tomlParser) peek() byte {
	if p.pos < len(p.src) {
		return p.src[p.pos]
	}
	return 0
}

// skipSpaces skips spaces and tabs.
func (p *tomlParser) skipSpaces() {
	for p.peek() == ' ' || p.peek() == '\t' {
		p.pos++
	}
}

// skipBlank skips whitespace, line ends and comments.
func (p *tomlParser) skipBlank() {
	for p.pos < len(p.src) {
		switch p.src[p.pos] {
		case '\n':
			p.line++
		case ' ', '\t', '\r':
		case '#':
			for p.pos < len(p.src) && p.src[p.pos] != '\n' {
				p.pos++
			}
			continue
		default:
			return
		}
		p.pos++
	}
}

// endOfLine checks that nothing but a comment follows on the line.
func (p *tomlParser) endOfLine() error {
	p.skipSpaces()
	if c := p.peek(); c != 0 && c != '\n' && c != '#' && !strings.HasPrefix(p.src[p.pos:], "\r\n") {
		return p.invalid("unexpected %q after the value", c)
	}
	return nil
}

// tableHeader reads [a.b.c] and returns its dotted name; otherTable for
// an array of tables or a quoted name that it does not read.
func (p *tomlParser) tableHeader() (string, error) {
	p.pos++
	array := p.peek() == '['
	if array {
		p.pos++
	}
	end := strings.IndexAny(p.src[p.pos:], "]\n")
	if end < 0 || p.src[p.pos+end] != ']' || array && !strings.HasPrefix(p.src[p.pos+end:], "]]") {
		return "", p.invalid("a table name without its closing ]")
	}
	inner := p.src[p.pos : p.pos+end]
	p.pos += end + 1
	if array {
		p.pos++
	}
	parts := strings.Split(inner, ".")
	for i, part := range parts {
		parts[i] = strings.Trim(part, " \t")
	}
	name := strings.Join(parts, ".")
	switch quoted := strings.ContainsAny(inner, `"'`); {
	case (quoted || array) && !p.reads(name):
		return otherTable, p.endOfLine()
	case quoted:
		return "", p.unsupported("quoted table names")
	case array:
		return "", p.unsupported("arrays of tables [[…]]")
	}
	for _, part := range parts {
		if !isBareKey(part) {
			return "", p.invalid("table name %q: want letters, digits, _ and - between dots", name)
		}
	}
	return name, p.endOfLine()
}

// skipKeyValue passes over a key = value line of a table the parser does
// not read: its key may be quoted or dotted, its value of any kind.
func (p *tomlParser) skipKeyValue() error {
	for {
		p.skipSpaces()
		var err error
		switch c := p.peek(); {
		case c == '"':
			_, err = p.basicString()
		case c == '\'':
			_, err = p.literalString()
		case isBareKey(string(c)):
			for isBareKey(string(p.peek())) {
				p.pos++
			}
		default:
			return p.invalid("want a key or a [table], found %q", c)
		}
		if p.skipSpaces(); err != nil || p.peek() != '.' {
			if err == nil && p.peek() != '=' {
				err = p.invalid("want = after a key")
			}
			if err != nil {
				return err
			}
			break
		}
		p.pos++
	}
	p.pos++
	p.skipSpaces()
	if err := p.skipValue(); err != nil {
		return err
	}
	return p.endOfLine()
}

// skipValue passes over a value of any TOML kind: strings of the four
// kinds, arrays and inline tables, nested, and bare values (numbers,
// booleans, dates and times, which may hold a space).
func (p *tomlParser) skipValue() error {
	for depth := 0; ; {
		rest, c := p.src[p.pos:], p.peek()
		var err error
		switch {
		case c == 0 || depth == 0 && (c == '\n' || c == '\r' || c == '#'):
			if depth > 0 {
				return p.invalid("an array or inline table without its closing bracket")
			}
			return nil
		case strings.HasPrefix(rest, `"""`) || strings.HasPrefix(rest, "'''"):
			err = p.skipMultiline(rest[:3])
		case c == '"':
			_, err = p.basicString()
		case c == '\'':
			_, err = p.literalString()
		case c == '#' || c == '\n':
			p.skipBlank() // inside an array
			continue
		case c == '[' || c == '{':
			depth++
		case c == ']' || c == '}':
			if depth--; depth < 0 {
				return p.invalid("unexpected %q", c)
			}
		}
		if err != nil {
			return err
		}
		if !strings.ContainsRune(`"'`, rune(c)) {
			p.pos++
		}
		if depth == 0 && strings.ContainsRune(`"']}`, rune(c)) {
			return nil
		}
	}
}

// skipMultiline passes over a multi-line string from its opening delim,
// three double quotes (basic) or three single quotes (literal), written
// here in words because gofmt turns two single quotes into a closing
// typographic one. A basic one's backslash escapes the next byte.
func (p *tomlParser) skipMultiline(delim string) error {
	for p.pos += 3; p.pos < len(p.src); p.pos++ {
		switch c := p.src[p.pos]; {
		case c == '\n':
			p.line++
		case c == '\\' && delim == `"""` && p.pos+1 < len(p.src):
			if p.pos++; p.src[p.pos] == '\n' {
				p.line++
			}
		case strings.HasPrefix(p.src[p.pos:], delim):
			p.pos += 3
			for n := 0; n < 2 && p.peek() == delim[0]; n++ { // quotes just before the closing ones
				p.pos++
			}
			return nil
		}
	}
	return p.invalid("a multi-line string without its closing %s", delim)
}

// isBareKey reports whether s is a TOML bare key: A-Za-z0-9_-, not empty.
func isBareKey(s string) bool {
	return s != "" && strings.Trim(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-") == ""
}

// keyValue reads key = value.
func (p *tomlParser) keyValue(table string) (tomlEntry, error) {
	e := tomlEntry{table: table, line: p.line}
	if c := p.peek(); c == '"' || c == '\'' {
		return e, p.unsupported("quoted keys")
	}
	start := p.pos
	for p.pos < len(p.src) && isBareKey(p.src[p.pos:p.pos+1]) {
		p.pos++
	}
	e.key = p.src[start:p.pos]
	p.skipSpaces()
	switch {
	case e.key == "":
		return e, p.invalid("want a key or a [table], found %q", p.peek())
	case p.peek() == '.':
		return e, p.unsupported("dotted keys (" + e.key + ".…): write a [table] and the key in it")
	case p.peek() != '=':
		return e, p.invalid("want = after %s", e.key)
	}
	p.pos++
	p.skipSpaces()
	var err error
	if e.val, err = p.value(); err != nil {
		return e, err
	}
	return e, p.endOfLine()
}

// value reads one value.
func (p *tomlParser) value() (tomlValue, error) {
	switch {
	case strings.HasPrefix(p.src[p.pos:], `"""`) || strings.HasPrefix(p.src[p.pos:], "'''"):
		return tomlValue{}, p.unsupported("multi-line strings")
	case p.peek() == '"':
		s, err := p.basicString()
		return tomlValue{kind: tomlString, str: s}, err
	case p.peek() == '\'':
		s, err := p.literalString()
		return tomlValue{kind: tomlString, str: s}, err
	case p.peek() == '[':
		list, err := p.array()
		return tomlValue{kind: tomlStrings, list: list}, err
	case p.peek() == '{':
		return tomlValue{}, p.unsupported("inline tables {…}")
	}
	return p.bareValue()
}

// basicString reads "…" with its escapes.
func (p *tomlParser) basicString() (string, error) {
	var b strings.Builder
	for p.pos++; ; {
		c := p.peek()
		switch {
		case c == '"':
			p.pos++
			return b.String(), nil
		case c == 0 || c == '\n':
			return "", p.invalid("a string without its closing quote")
		case c == '\\':
			r, err := p.escape()
			if err != nil {
				return "", err
			}
			b.WriteRune(r)
			continue
		case c < 0x20 && c != '\t' || c == 0x7f:
			return "", p.invalid("a control character in a string")
		}
		b.WriteByte(c)
		p.pos++
	}
}

// escape reads one escape of a basic string, from its backslash.
func (p *tomlParser) escape() (rune, error) {
	p.pos++
	c := p.peek()
	if r, ok := map[byte]rune{'b': '\b', 't': '\t', 'n': '\n', 'f': '\f', 'r': '\r', '"': '"', '\\': '\\'}[c]; ok {
		p.pos++
		return r, nil
	}
	digits := map[byte]int{'u': 4, 'U': 8}[c]
	if digits == 0 || p.pos+1+digits > len(p.src) {
		return 0, p.unsupported(fmt.Sprintf("the escape \\%c (TOML 1.0 has \\b \\t \\n \\f \\r \\\" \\\\ \\uXXXX \\UXXXXXXXX)", c))
	}
	n, err := strconv.ParseUint(p.src[p.pos+1:p.pos+1+digits], 16, 32)
	if err != nil || !utf8.ValidRune(rune(n)) {
		return 0, p.invalid("\\%c%s is not a Unicode scalar value", c, p.src[p.pos+1:p.pos+1+digits])
	}
	p.pos += 1 + digits
	return rune(n), nil
}

// literalString reads '…', which has no escapes.
func (p *tomlParser) literalString() (string, error) {
	p.pos++
	start := p.pos
	for c := p.peek(); c != '\''; c = p.peek() {
		switch {
		case c == 0 || c == '\n':
			return "", p.invalid("a string without its closing quote")
		case c < 0x20 && c != '\t' || c == 0x7f:
			return "", p.invalid("a control character in a string")
		}
		p.pos++
	}
	p.pos++
	return p.src[start : p.pos-1], nil
}

// array reads [ "a", 'b', ] over any number of lines, with comments.
func (p *tomlParser) array() ([]string, error) {
	list := []string{}
	for p.pos++; ; {
		p.skipBlank()
		switch c := p.peek(); {
		case c == 0:
			return nil, p.invalid("an array without its closing ]")
		case c == ']':
			p.pos++
			return list, nil
		case c == '[':
			return nil, p.unsupported("arrays of arrays")
		case c != '"' && c != '\'':
			return nil, p.unsupported("arrays of other than strings")
		}
		v, err := p.value()
		if err != nil {
			return nil, err
		}
		list = append(list, v.str)
		p.skipBlank()
		switch p.peek() {
		case ',':
			p.pos++
		case ']':
		default:
			return nil, p.invalid("want , or ] after an array's element")
		}
	}
}

// bareValue reads a boolean or a decimal integer. Floats, dates and
// integers in other bases are refused; the token is never quoted in the
// error, as it may be a password written without quotes.
func (p *tomlParser) bareValue() (tomlValue, error) {
	start := p.pos
	for c := p.peek(); c != 0 && !strings.ContainsRune(" \t\r\n#,]", rune(c)); c = p.peek() {
		p.pos++
	}
	tok := p.src[start:p.pos]
	unsigned := strings.TrimLeft(tok, "+-")
	switch {
	case tok == "true" || tok == "false":
		return tomlValue{kind: tomlBool, flag: tok == "true"}, nil
	case tok == "":
		return tomlValue{}, p.invalid("a key without a value")
	case len(tok) >= 5 && isDigits(tok[:4]) && tok[4] == '-', len(tok) >= 3 && isDigits(tok[:2]) && tok[2] == ':':
		return tomlValue{}, p.unsupported("dates and times")
	case len(unsigned) > 1 && unsigned[0] == '0' && strings.ContainsRune("xob", rune(unsigned[1])):
		return tomlValue{}, p.unsupported("integers in hexadecimal, octal or binary")
	case unsigned == "inf" || unsigned == "nan" || unsigned != "" && isDigits(unsigned[:1]) && strings.ContainsAny(unsigned, ".eE"):
		return tomlValue{}, p.unsupported("floats")
	}
	n, err := parseTOMLInt(tok)
	if err != nil {
		return tomlValue{}, p.invalid("%v", err)
	}
	return tomlValue{kind: tomlInt, num: n}, nil
}

// parseTOMLInt reads a TOML decimal integer: an optional sign, no leading
// zero, an underscore only between two digits.
func parseTOMLInt(tok string) (int64, error) {
	digits := strings.TrimLeft(tok, "+-")
	ok := len(tok)-len(digits) <= 1 && digits != "" && (digits == "0" || digits[0] != '0') &&
		!strings.HasPrefix(digits, "_") && !strings.HasSuffix(digits, "_") && !strings.Contains(digits, "__") &&
		isDigits(strings.ReplaceAll(digits, "_", ""))
	if !ok {
		return 0, errors.New("a value that is not a string in quotes, a whole number, true or false")
	}
	n, err := strconv.ParseInt(strings.ReplaceAll(tok, "_", ""), 10, 64)
	if err != nil {
		return 0, errors.New("a whole number out of the 64-bit range")
	}
	return n, nil
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
		if st, err = openStore(cfg.storeDir(), cfg.fsyncInterval, newStoreLink(), log, h.drops); err != nil {
			for _, ln := range lns {
				ln.Close()
			}
			return nil, err
		}
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
		upWait = nil // already returned
		if err == nil {
			// Every upstream returns nil only at the stop, and may see
			// ctx end before this select does.
			s.log.Info("stopping")
			break
		}
		s.log.Error("upstream failed; stopping", "err", err)
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
		Handler:           s,
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
	handedOver := false
	defer func() {
		if !handedOver { // the upgrade failed, or panicked (x/net does when it cannot hijack)
			s.hub.release(doc)
		}
	}()
	nc, pending, err := upgrade(w, r)
	if err != nil {
		s.log.Debug("websocket handshake failed", "doc", doc, "remote", r.RemoteAddr, "err", err)
		return
	}
	// The editor's reader, a goroutine of its own, takes the connection
	// over (and releases the admission at its end); this one returns, and
	// with it goes what net/http kept for the request.
	handedOver = true
	go s.hub.serve(nc, pending, doc, r.RemoteAddr)
}

// errHandshake is a WebSocket handshake that x/net/websocket refused (and
// answered with 400 or 403).
var errHandshake = errors.New("websocket handshake refused")

// upgrade answers r's WebSocket handshake and returns the connection, which
// the relay then reads and writes itself (hub.serve), with pending, the
// bytes net/http had read past the request: a client may send frames
// before it sees the answer. x/net/websocket checks the request and writes
// the answer (RFC 6455 §4.2.2); its Conn, and with it net/http's 4 KiB
// read and write buffers, is let go at once, so that an idle editor holds
// none of them. Errors: errHandshake.
func upgrade(w http.ResponseWriter, r *http.Request) (nc net.Conn, pending []byte, err error) {
	tap := &hijackTap{ResponseWriter: w}
	upgraded := false
	websocket.Server{
		// The gate has decided about Origin already; websocket.Handler
		// would refuse the native clients that send none.
		Handshake: func(*websocket.Config, *http.Request) error { return nil },
		Handler:   func(*websocket.Conn) { upgraded = true },
	}.ServeHTTP(tap, r)
	if !upgraded {
		if tap.conn != nil {
			tap.conn.Close()
		}
		return nil, nil, errHandshake
	}
	if n := tap.rw.Reader.Buffered(); n > 0 {
		b, _ := tap.rw.Reader.Peek(n)
		pending = bytes.Clone(b) // not a slice of the 4 KiB buffer, which can go
	}
	return tap.conn, pending, nil
}

// hijackTap is the ResponseWriter that upgrade hands x/net/websocket: it
// keeps the hijacked connection and net/http's reader for upgrade, and
// gives the library the connection with a Close that does nothing, since
// the relay goes on with the connection after the library is done.
type hijackTap struct {
	http.ResponseWriter
	conn net.Conn
	rw   *bufio.ReadWriter
}

// Hijack takes the connection over from net/http.
func (t *hijackTap) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, rw, err := http.NewResponseController(t.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	t.conn, t.rw = conn, rw
	return keptConn{conn}, rw, nil
}

// keptConn is a connection that its user may not close.
type keptConn struct{ net.Conn }

// Close does nothing: the connection is closed by whoever kept it.
func (keptConn) Close() error { return nil }

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
	if crossSiteSubrequest(r) {
		s.refuse(w, r, http.StatusForbidden, refusedOrigin, "a request from another site's page (Sec-Fetch-Site: cross-site)")
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "elva-service: "+r.Method+" not allowed here; GET the status or the metrics", http.StatusMethodNotAllowed)
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if r.URL.Path == "/" && wantsHTML(r) {
		servePage(w)
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
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		w.Write(rep.metrics(s.hub.drops))
		return
	}
	serveJSON(w, rep)
}

// crossSiteSubrequest reports whether r comes from another site's page
// without being a navigation: an <img> or a no-cors fetch, which a browser
// sends without Origin. It could not read the answer, but it would make
// the relay work; a link followed to the page is a navigation and fine.
func crossSiteSubrequest(r *http.Request) bool {
	return r.Header.Get("Sec-Fetch-Site") == "cross-site" && r.Header.Get("Sec-Fetch-Mode") != "navigate"
}

// servePage writes the status page with its Content-Security-Policy.
func servePage(w http.ResponseWriter) {
	w.Header().Set("Content-Security-Policy", pageCSP)
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Write(statusPage)
}

// serveJSON writes rep as indented JSON.
func serveJSON(w http.ResponseWriter, rep *statusReport) {
	body, err := json.MarshalIndent(rep, "", "  ")
	if err != nil { // only plain values: cannot happen
		http.Error(w, "elva-service: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(append(body, '\n'))
}

// pageCSP lets the status page run its own inline script and style,
// named by their SHA-256 hashes, and fetch the JSON from its own origin;
// nothing else (CSP Level 3, "hash-source").
var pageCSP = contentSecurityPolicy(statusPage)

// contentSecurityPolicy is the policy for page: the hashes of its first
// <script> and <style> elements' text. A page without one gets none
// allowed.
func contentSecurityPolicy(page []byte) string {
	return "default-src 'none'; script-src " + inlineHash(page, "script") + "; style-src " + inlineHash(page, "style") +
		"; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
}

// inlineHash is the CSP hash source of the text of page's first <tag>
// element, or 'none'.
func inlineHash(page []byte, tag string) string {
	_, rest, ok := bytes.Cut(page, []byte("<"+tag+">"))
	if !ok {
		return "'none'"
	}
	text, _, ok := bytes.Cut(rest, []byte("</"+tag+">"))
	if !ok {
		return "'none'"
	}
	sum := sha256.Sum256(text)
	return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
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
