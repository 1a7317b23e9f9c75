package main

// The wire format: lib0 varuints, the ID prefix of the ELVA upstream protocol
// and the envelope of the Yjs messages that local editors exchange. Everything
// here is a pure function on []byte: no I/O, no logging. Every decoder checks a
// length before it indexes, so hostile bytes give an error, never a panic.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"unicode/utf8"
)

// Yjs message types (the first varuint of every message, see PROTOCOL.md §1).
const (
	msgSync           = 0
	msgAwareness      = 1
	msgAuth           = 2
	msgQueryAwareness = 3
)

// Sync message subtypes (the second varuint of a sync message).
const (
	syncStep1  = 0
	syncStep2  = 1
	syncUpdate = 2
)

// maxVaruintLen is the longest encoding of a 64-bit varuint: 10 groups of 7 bits.
const maxVaruintLen = 10

var (
	errShortFrame     = errors.New("codec: short frame")
	errOverflow       = errors.New("codec: varuint overflows 64 bits")
	errNoIDPrefix     = errors.New("codec: frame has no ID prefix")
	errEmptyMsg       = errors.New("codec: empty message")
	errUnknownType    = errors.New("codec: unknown message type")
	errTooManyEntries = errors.New("codec: too many awareness entries")
	// Frame rules (classifyFrame, checkFrameHeader).
	errTextFrame  = errors.New("text frame: Yjs messages are binary")
	errFragmented = errors.New("fragmented message: not supported")
	errTooLarge   = errors.New("message larger than --max-message")
	errProtocol   = errors.New("websocket protocol error")
	errStopping   = errors.New("relay stopping")
)

// idMagic is the two type bytes that open an ID message on the upstream.
type idMagic [2]byte

var (
	// magicSeed is the ID message type of the ELVA protocol that the seed documents.
	magicSeed = idMagic{0x02, 0x00}
	// magicASCII is "ID", the type used by the ELVA server release of mid-2025.
	magicASCII = idMagic{0x49, 0x44}
)

// parseIDMagic accepts the two spellings that ELVA servers are known to use.
func parseIDMagic(s string) (idMagic, error) {
	switch s {
	case "0200":
		return magicSeed, nil
	case "4944":
		return magicASCII, nil
	}
	return idMagic{}, fmt.Errorf("id magic %q: want 0200 or 4944", s)
}

// String gives the hex form used on the command line.
func (m idMagic) String() string { return fmt.Sprintf("%02x%02x", m[0], m[1]) }

// readVaruint decodes the lib0 varuint at the start of b and returns it with
// the number of bytes it took.
func readVaruint(b []byte) (v uint64, n int, err error) {
	var shift uint
	for n < len(b) {
		c := b[n]
		n++
		// The tenth group holds bit 63 only; anything more overflows.
		if n == maxVaruintLen && c > 1 {
			return 0, 0, errOverflow
		}
		v |= uint64(c&0x7f) << shift
		if c < 0x80 {
			return v, n, nil
		}
		shift += 7
	}
	return 0, 0, errShortFrame
}

// appendVaruint appends the lib0 varuint encoding of v to b.
func appendVaruint(b []byte, v uint64) []byte {
	for v >= 0x80 {
		b = append(b, byte(v)|0x80)
		v >>= 7
	}
	return append(b, byte(v))
}

// readBytes decodes a varuint length followed by that many bytes. The field
// aliases b. n is the total number of bytes taken.
func readBytes(b []byte) (field []byte, n int, err error) {
	size, n, err := readVaruint(b)
	if err != nil {
		return nil, 0, err
	}
	// Compare in uint64 so that a declared length near 2^64 cannot wrap.
	if size > uint64(len(b)-n) {
		return nil, 0, errShortFrame
	}
	end := n + int(size)
	return b[n:end], end, nil
}

// appendIDPrefix appends the ID message for doc: magic, varuint length, UTF-8 bytes.
func appendIDPrefix(b []byte, m idMagic, doc string) []byte {
	b = append(b, m[0], m[1])
	b = appendVaruint(b, uint64(len(doc)))
	return append(b, doc...)
}

// idPrefixLen is the length of the ID prefix of doc: magic, varuint
// length, the name's bytes.
func idPrefixLen(doc string) int {
	return 2 + varuintLen(uint64(len(doc))) + len(doc)
}

// varuintLen is the number of bytes appendVaruint takes for v.
func varuintLen(v uint64) int {
	n := 1
	for ; v >= 0x80; v >>= 7 {
		n++
	}
	return n
}

// splitIDFrame decodes an upstream frame into its document ID and the local
// message that follows the prefix. msg aliases frame.
func splitIDFrame(m idMagic, frame []byte) (doc string, msg []byte, err error) {
	if len(frame) < 2 || frame[0] != m[0] || frame[1] != m[1] {
		return "", nil, errNoIDPrefix
	}
	id, n, err := readBytes(frame[2:])
	if err != nil {
		return "", nil, fmt.Errorf("id prefix: %w", err)
	}
	return string(id), frame[2+n:], nil
}

// messageKind checks the envelope of one Yjs message and returns its type.
// Every length the message declares must fit inside it; trailing bytes are
// allowed because Yjs decoders ignore them too. The payload itself (updates,
// state vectors) is not decoded: the relay passes it on unchanged.
func messageKind(msg []byte) (uint64, error) {
	if len(msg) == 0 {
		return 0, errEmptyMsg
	}
	kind, n, err := readVaruint(msg)
	if err != nil {
		return 0, err
	}
	rest := msg[n:]
	switch kind {
	case msgSync:
		err = checkSync(rest)
	case msgAwareness:
		_, _, err = readBytes(rest)
	case msgAuth:
		err = checkAuth(rest)
	case msgQueryAwareness:
		// No body.
	default:
		err = fmt.Errorf("%w %d", errUnknownType, kind)
	}
	return kind, err
}

// checkSync checks a sync message body: subtype, then one byte string.
func checkSync(b []byte) error {
	sub, n, err := readVaruint(b)
	if err != nil {
		return err
	}
	if sub > syncUpdate {
		return fmt.Errorf("%w: sync subtype %d", errUnknownType, sub)
	}
	_, _, err = readBytes(b[n:])
	return err
}

// checkAuth checks an auth message body: varuint kind, then one string.
func checkAuth(b []byte) error {
	_, n, err := readVaruint(b)
	if err != nil {
		return err
	}
	_, _, err = readBytes(b[n:])
	return err
}

// awarenessEntry is one client's entry in an awareness update.
type awarenessEntry struct {
	client uint64
	clock  uint64
	gone   bool // the state is JSON null: the client has left
}

// minAwarenessEntry is the fewest bytes one entry takes: client, clock and
// an empty state, one byte each.
const minAwarenessEntry = 3

// maxAwarenessEntries bounds the clients in one awareness update. A Yjs
// client answers a query with every state it knows, a few dozen in a busy
// document; a message with thousands is an attack on the relay's tracking.
const maxAwarenessEntries = 1024

// readAwareness decodes an awareness message (type 1) into its entries,
// appended to dst: varuint count, then per entry varuint client ID,
// varuint clock and the state as a JSON string. The JSON is not parsed
// beyond telling null from the rest.
func readAwareness(msg []byte, dst []awarenessEntry) ([]awarenessEntry, error) {
	kind, n, err := readVaruint(msg)
	if err != nil {
		return dst, err
	}
	if kind != msgAwareness {
		return dst, fmt.Errorf("%w %d: not awareness", errUnknownType, kind)
	}
	update, _, err := readBytes(msg[n:])
	if err != nil {
		return dst, err
	}
	count, n, err := readVaruint(update)
	if err != nil {
		return dst, err
	}
	rest := update[n:]
	// Check the count against the bytes before trusting it for anything.
	if count > uint64(len(rest)/minAwarenessEntry) {
		return dst, errShortFrame
	}
	if count > maxAwarenessEntries {
		return dst, fmt.Errorf("%w: %d entries", errTooManyEntries, count)
	}
	for range count {
		var e awarenessEntry
		if e.client, n, err = readVaruint(rest); err != nil {
			return dst, err
		}
		rest = rest[n:]
		if e.clock, n, err = readVaruint(rest); err != nil {
			return dst, err
		}
		rest = rest[n:]
		state, n, err := readBytes(rest)
		if err != nil {
			return dst, err
		}
		rest = rest[n:]
		e.gone = string(state) == "null"
		dst = append(dst, e)
	}
	return dst, nil
}

// appendAwarenessGone appends an awareness message that marks every client
// in entries as gone: state null, with a clock one past the one given, so
// that every Yjs peer drops the state at once.
func appendAwarenessGone(b []byte, entries []awarenessEntry) []byte {
	var update []byte
	update = appendVaruint(update, uint64(len(entries)))
	for _, e := range entries {
		update = appendVaruint(update, e.client)
		update = appendVaruint(update, e.clock+1)
		update = appendVaruint(update, 4)
		update = append(update, "null"...)
	}
	b = appendVaruint(b, msgAwareness)
	b = appendVaruint(b, uint64(len(update)))
	return append(b, update...)
}

// isStep1 reports whether msg is a sync step 1, by its two type bytes.
func isStep1(msg []byte) bool {
	return len(msg) >= 2 && msg[0] == msgSync && msg[1] == syncStep1
}

// isStep2 reports whether msg is a sync step 2. It looks at the two type
// bytes only; messageKind has checked the rest.
func isStep2(msg []byte) bool {
	return len(msg) >= 2 && msg[0] == msgSync && msg[1] == syncStep2
}

// emptyStep1 is a sync step 1 with the empty state vector: "I know
// nothing, send me everything". Every Yjs peer answers it with a step 2
// holding its whole document. Shared, never modified.
var emptyStep1 = []byte{msgSync, syncStep1, 1, 0}

// peerCloseError is the close frame a peer sent (RFC 6455 §5.5.1): its
// status code, 1005 when it gave none (§7.1.5), and its reason.
type peerCloseError struct {
	code   int
	reason string
	// answer is true when the frame answered the relay's own close: the
	// relay, not the peer, ended the connection.
	answer bool
}

func (e *peerCloseError) Error() string {
	if e.reason == "" {
		return fmt.Sprintf("closed by the peer with code %d", e.code)
	}
	return fmt.Sprintf("closed by the peer with code %d: %q", e.code, e.reason)
}

// isPeerClose reports whether err is the peer's close frame.
func isPeerClose(err error) bool {
	var pc *peerCloseError
	return errors.As(err, &pc)
}

// parseClose decodes a close frame's payload: nothing, or a two-byte
// big-endian status code and a UTF-8 reason (RFC 6455 §5.5.1). Anything
// else is a protocol error.
func parseClose(payload []byte) (*peerCloseError, error) {
	switch {
	case len(payload) == 0:
		return &peerCloseError{code: 1005}, nil
	case len(payload) == 1:
		return nil, fmt.Errorf("%w: close frame with a one-byte payload", errProtocol)
	case !utf8.Valid(payload[2:]):
		return nil, fmt.Errorf("%w: close reason is not UTF-8", errProtocol)
	}
	return &peerCloseError{code: int(binary.BigEndian.Uint16(payload)), reason: string(payload[2:])}, nil
}

// echoCode is the code that answers a peer's close: the peer's own, as
// RFC 6455 §5.5.1 suggests, when an endpoint may send it (§7.4: not 1005,
// 1006, 1015 or unassigned ones), else 1000.
func echoCode(code int) int {
	switch {
	case code >= 3000 && code <= 4999:
		return code
	case code >= 1000 && code <= 1014 && code != 1004 && code != 1005 && code != 1006:
		return code
	}
	return closeNormal
}

// WebSocket frame rules (RFC 6455): what the relay's readers take, and
// the close codes they answer with.

// WebSocket close codes (RFC 6455 §7.4.1) that the relay sends.
const (
	closeNormal      = 1000
	closeGoingAway   = 1001
	closeProtocol    = 1002
	closeUnsupported = 1003
	closeTooBig      = 1009
	closeTryAgain    = 1013
	// closePeerTimeout closes a peer that sent nothing for --peer-timeout:
	// a private code (RFC 6455 §7.4.2), the one Hocuspocus uses for
	// "Connection Timeout".
	closePeerTimeout = 4408
)

// maxControlPayload is the largest payload of a ping, pong or close frame
// (RFC 6455 §5.5).
const maxControlPayload = 125

// checkFrameHeader rejects what the relay does not speak: RSV bits (no
// extension was negotiated, so a "compressed" frame is an error) and a
// masking that does not fit the side (clients mask, servers do not).
func checkFrameHeader(hdr []byte, fromClient bool) error {
	if hdr[0]&0x70 != 0 {
		return fmt.Errorf("%w: RSV bits set", errProtocol)
	}
	if masked := hdr[1]&0x80 != 0; masked != fromClient {
		return fmt.Errorf("%w: masking does not fit the side", errProtocol)
	}
	return nil
}

// closeCodeFor maps the reason a reader ended to the close code it answers with.
func closeCodeFor(err error) int {
	var pc *peerCloseError
	var netErr net.Error
	switch {
	case errors.As(err, &pc):
		return echoCode(pc.code)
	case errors.As(err, &netErr) && netErr.Timeout():
		return closePeerTimeout
	case errors.Is(err, errTextFrame), errors.Is(err, errFragmented):
		return closeUnsupported
	case errors.Is(err, errTooLarge):
		return closeTooBig
	case errors.Is(err, errProtocol):
		return closeProtocol
	}
	return closeNormal
}

// classifyFrame applies the relay's rules to a frame header: fin, the
// opcode and the payload size in bytes, against max, the largest message
// taken. control is true for a ping, pong or close (RFC 6455 §5.5: at
// most 125 bytes, never fragmented). Errors: errFragmented for a
// continuation or a frame without FIN (the relay passes whole messages
// only), errTooLarge, errTextFrame (Yjs messages are binary), errProtocol
// for a reserved opcode or a bad control frame.
func classifyFrame(fin bool, opcode byte, size, max int) (control bool, err error) {
	switch {
	case opcode >= opClose:
		if !fin || size > maxControlPayload || size < 0 || opcode > opPong {
			return true, fmt.Errorf("%w: bad control frame (opcode %d)", errProtocol, opcode)
		}
		return true, nil
	case opcode == opContinuation || !fin:
		return false, errFragmented
	case size > max || size < 0:
		return false, errTooLarge
	case opcode == opText:
		return false, errTextFrame
	case opcode != opBinary:
		return false, fmt.Errorf("%w: reserved opcode %d", errProtocol, opcode)
	}
	return false, nil
}

// WebSocket opcodes (RFC 6455 §5.2).
const (
	opContinuation = 0x0
	opText         = 0x1
	opBinary       = 0x2
	opClose        = 0x8
	opPing         = 0x9
	opPong         = 0xa
)
