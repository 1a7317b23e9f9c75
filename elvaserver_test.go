package main

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// elvaServer is an in-test ELVA server in broadcast mode (PROTOCOL.md §2):
// it accepts upgrades on / only, reads the ID prefix of each frame, joins
// the sender to that document's room and passes the frame, prefix and all,
// to every other connection in the room. It can require Basic credentials
// and refuse handshakes with a given status.
type elvaServer struct {
	t     testing.TB
	srv   *httptest.Server
	magic idMagic

	user, password string       // when user is set, handshakes need Basic auth
	refuse         atomic.Int32 // when not 0, handshakes get this status
	attempts       atomic.Int32 // handshakes seen
	authHeaders    chan string  // the Authorization header of each handshake
	connected      chan *websocket.Conn
	disconnected   chan struct{} // a connection's last frame has been read
	frames         chan []byte   // every frame received, in order; nil: none kept

	mu    sync.Mutex // guards rooms and conns: test code, kept simple
	rooms map[string]map[*websocket.Conn]bool
	conns map[*websocket.Conn]bool
}

// newELVAServer starts a broadcast-mode server on 127.0.0.1 and stops it
// when the test ends.
func newELVAServer(t testing.TB, magic idMagic) *elvaServer {
	t.Helper()
	s := unstartedELVAServer(t, magic)
	s.srv.Start()
	return s
}

// unstartedELVAServer builds a server for the caller to start, with or
// without TLS.
func unstartedELVAServer(t testing.TB, magic idMagic) *elvaServer {
	s := &elvaServer{
		t:            t,
		magic:        magic,
		authHeaders:  make(chan string, 100),
		connected:    make(chan *websocket.Conn, 100),
		disconnected: make(chan struct{}, 100),
		frames:       make(chan []byte, 10000),
		rooms:        make(map[string]map[*websocket.Conn]bool),
		conns:        make(map[*websocket.Conn]bool),
	}
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(s.handle))
	t.Cleanup(s.close)
	return s
}

// url is the server's ws:// URI.
func (s *elvaServer) url() string { return "ws" + strings.TrimPrefix(s.srv.URL, "http") + "/" }

func (s *elvaServer) handle(w http.ResponseWriter, r *http.Request) {
	s.attempts.Add(1)
	select {
	case s.authHeaders <- r.Header.Get("Authorization"):
	default: // a long test does not read them all
	}
	if code := s.refuse.Load(); code != 0 {
		http.Error(w, "refused by test", int(code))
		return
	}
	if r.URL.Path != "/" {
		http.Error(w, "only / is served", http.StatusForbidden)
		return
	}
	if s.user != "" {
		user, password, ok := r.BasicAuth()
		if !ok || user != s.user || password != s.password {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			http.Error(w, "invalid credentials", http.StatusUnauthorized)
			return
		}
	}
	websocket.Server{
		Handshake: func(*websocket.Config, *http.Request) error { return nil },
		Handler:   s.serve,
	}.ServeHTTP(w, r)
}

func (s *elvaServer) serve(ws *websocket.Conn) {
	ws.PayloadType = websocket.BinaryFrame
	s.mu.Lock()
	s.conns[ws] = true
	s.mu.Unlock()
	s.connected <- ws
	defer func() {
		s.drop(ws)
		select {
		case s.disconnected <- struct{}{}:
		default:
		}
	}()
	for {
		var data []byte
		if err := websocket.Message.Receive(ws, &data); err != nil {
			return
		}
		if s.frames != nil {
			select {
			case s.frames <- data:
			default:
				s.t.Errorf("test server: frame log full")
			}
		}
		doc, _, err := splitIDFrame(s.magic, data)
		if err != nil {
			s.t.Errorf("test server: frame without ID prefix: % x", data)
			continue
		}
		s.relay(ws, doc, data)
	}
}

// relay joins from to doc's room and sends data to the room's other members.
func (s *elvaServer) relay(from *websocket.Conn, doc string, data []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	room := s.rooms[doc]
	if room == nil {
		room = make(map[*websocket.Conn]bool)
		s.rooms[doc] = room
	}
	room[from] = true
	for c := range room {
		if c != from {
			// A deadline, so that a frozen peer cannot stall the server.
			c.SetWriteDeadline(time.Now().Add(time.Second))
			websocket.Message.Send(c, data)
		}
	}
}

func (s *elvaServer) drop(ws *websocket.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, ws)
	for _, room := range s.rooms {
		delete(room, ws)
	}
}

// sendAll writes data to every open upstream connection.
func (s *elvaServer) sendAll(data []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		if err := websocket.Message.Send(c, data); err != nil {
			s.t.Errorf("test server: send: %v", err)
		}
	}
}

// dropAll ends every open connection, as a server restart does, but keeps
// accepting new ones.
func (s *elvaServer) dropAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.Close()
	}
}

// close ends every connection and the listener.
func (s *elvaServer) close() {
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.srv.CloseClientConnections()
	s.srv.Close()
}

// waitConnected returns the next upstream connection the server accepted.
func (s *elvaServer) waitConnected(t testing.TB) *websocket.Conn {
	t.Helper()
	select {
	case ws := <-s.connected:
		return ws
	case <-time.After(testTimeout):
		t.Fatal("timed out waiting for the relay to connect upstream")
		return nil
	}
}

// nextFrame returns the next frame the server received.
func (s *elvaServer) nextFrame(t testing.TB) []byte {
	t.Helper()
	select {
	case f := <-s.frames:
		return f
	case <-time.After(testTimeout):
		t.Fatal("timed out waiting for a frame at the server")
		return nil
	}
}
