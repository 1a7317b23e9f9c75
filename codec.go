package main

// The wire format: lib0 varuints, the ID prefix of the ELVA upstream protocol
// and the envelope of the Yjs messages that local editors exchange. Everything
// here is a pure function on []byte: no I/O, no logging. Every decoder checks a
// length before it indexes, so hostile bytes give an error, never a panic.

import (
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
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

// closeAbnormal is the code that stands for a connection that ended
// without a close frame (RFC 6455 §7.1.5); it is never sent.
const closeAbnormal = 1006

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

// Yjs updates without a document (update format v1): the state vector an
// update carries, the merge of several updates and the part of an update
// that a state vector lacks, as yjs/src/utils/updates.js computes them,
// plus the checks the store builds on them. The wire layout, from
// yjs/src/utils/encoding.js (writeClientsStructs), Item.js (write) and
// DeleteSet.js (writeDeleteSet), all numbers lib0 varuints:
//
//	update    = #chunks, chunk*, deleteSet
//	chunk     = #structs, client, clock of the first struct, struct*
//	struct    = info byte, then by info&31: 0 GC (length), 10 Skip (length),
//	            1..9 an Item: [origin ID] [right origin ID]
//	            [parent, [parentSub], when it has neither], content
//	deleteSet = #clients, (client, #ranges, (clock, length)*)*
//
// Clocks count UTF-16 code units for strings, elements for arrays, 1 for
// the rest. Contents stay in their wire bytes; only strings are decoded,
// and only to count and split them.

// Struct refs: the low five bits of the info byte (structs/GC.js,
// structs/Skip.js and the contentRefs table of structs/Item.js).
const (
	refGC      = 0
	refDeleted = 1 // ContentDeleted: a length, no content
	refJSON    = 2 // ContentJSON: JSON strings, the legacy array content
	refBinary  = 3
	refString  = 4
	refEmbed   = 5
	refFormat  = 6
	refType    = 7
	refAny     = 8 // ContentAny: lib0 Any values
	refDoc     = 9
	refSkip    = 10
)

// Info byte bits of an Item (Item.js write: binary.BITS5, BIT8, BIT7, BIT6).
const (
	infoRef         = 0x1f // the content ref
	infoOrigin      = 0x80 // an origin ID follows
	infoRightOrigin = 0x40 // a right origin ID follows
	infoParentSub   = 0x20 // the parent info ends in a map key
)

// Type refs of ContentType (structs/ContentType.js typeRefs): YArray,
// YMap, YText, YXmlElement, YXmlFragment, YXmlHook, YXmlText.
const (
	typeXMLElement = 3 // the node name follows
	typeXMLHook    = 5 // the hook name follows
	typeRefs       = 7
)

// lib0 Any type bytes (lib0/decoding.js readAnyLookupTable), 127 down to 116.
const (
	anyUndefined = 127
	anyNull      = 126
	anyInt       = 125 // signed varint
	anyFloat32   = 124
	anyFloat64   = 123
	anyBigInt    = 122
	anyFalse     = 121
	anyTrue      = 120
	anyString    = 119
	anyObject    = 118 // count, then (string key, value) pairs
	anyArray     = 117 // count, then values
	anyBytes     = 116
)

// maxSafe is Number.MAX_SAFE_INTEGER. lib0 reads varuints into JS
// numbers, so a larger client, clock or length is no Yjs value, and
// keeping every clock below it keeps clock+length from overflowing.
const maxSafe = 1<<53 - 1

// errBadUpdate is an update or state vector that Yjs could not read
// either: an unknown ref, bad JSON, a clock past 2^53-1. Truncation is
// errShortFrame.
var errBadUpdate = errors.New("codec: malformed Yjs update")

// yid is a Yjs ID (utils/ID.js): a client and a clock.
type yid struct{ client, clock uint64 }

// block is one struct of an update: a GC, a Skip or an Item
// (yjs/src/structs). Its content stays in wire form, aliasing the update
// it came from; see readContent for the form of each ref.
type block struct {
	client, clock uint64
	length        uint64 // clock units the struct covers
	ref           byte   // refGC, refSkip or the Item's content ref
	// Items only.
	hasOrigin, hasRightOrigin bool
	origin, rightOrigin       yid    // zero when absent
	parentSub                 bool   // Item.parentSub != null: a map entry
	parent                    []byte // wire parent info, written when it has neither origin
	content                   []byte
}

// end is the clock just past b.
func (b *block) end() uint64 { return b.clock + b.length }

// cursor reads lib0 values off the front of b (lib0/decoding.js). Every
// method checks the length before it takes bytes.
type cursor struct{ b []byte }

// uint reads a varuint (decoding.readVarUint). Values past 2^53-1 are
// errBadUpdate: lib0 cannot hold them.
func (c *cursor) uint() (uint64, error) {
	v, n, err := readVaruint(c.b)
	if err != nil {
		return 0, err
	}
	if v > maxSafe {
		return 0, fmt.Errorf("%w: varuint %d above 2^53-1", errBadUpdate, v)
	}
	c.b = c.b[n:]
	return v, nil
}

// byte reads one byte (decoding.readUint8).
func (c *cursor) byte() (byte, error) {
	if len(c.b) == 0 {
		return 0, errShortFrame
	}
	v := c.b[0]
	c.b = c.b[1:]
	return v, nil
}

// bytes reads a varuint length and that many bytes
// (decoding.readVarUint8Array, readVarString). The result aliases c.b.
func (c *cursor) bytes() ([]byte, error) {
	v, n, err := readBytes(c.b)
	if err != nil {
		return nil, err
	}
	c.b = c.b[n:]
	return v, nil
}

// skip takes n bytes (the fixed-size Any numbers).
func (c *cursor) skip(n int) error {
	if len(c.b) < n {
		return errShortFrame
	}
	c.b = c.b[n:]
	return nil
}

// id reads a client and a clock (UpdateDecoderV1 readLeftID, readRightID).
func (c *cursor) id() (yid, error) {
	client, err := c.uint()
	if err != nil {
		return yid{}, err
	}
	clock, err := c.uint()
	return yid{client, clock}, err
}

// taken is the bytes c consumed since it held start.
func (c *cursor) taken(start []byte) []byte { return start[:len(start)-len(c.b)] }

// varInt skips a lib0 signed varint (decoding.readVarInt): six bits, a
// sign and a continue bit in the first byte, then seven bits a byte. Like
// lib0 it fails once a continued value passes 2^53-1; it counts in
// float64 as JS does.
func (c *cursor) varInt() error {
	r, err := c.byte()
	if err != nil || r&0x80 == 0 {
		return err
	}
	num, mult := float64(r&0x3f), 64.0
	for {
		if r, err = c.byte(); err != nil {
			return err
		}
		num += float64(r&0x7f) * mult
		mult *= 128
		if r < 0x80 {
			return nil
		}
		if num > maxSafe {
			return fmt.Errorf("%w: varint above 2^53-1", errBadUpdate)
		}
	}
}

// anyFrame is an Any array or object still being read: its entries left.
type anyFrame struct {
	left   uint64
	object bool // each entry is a string key, then a value
}

// skipAny takes one lib0 Any value (decoding.readAny). It walks nested
// arrays and objects with an explicit stack, so hostile nesting costs
// memory in proportion to the bytes, never Go stack.
func (c *cursor) skipAny() error {
	var stack []anyFrame
	for {
		n, container, object, err := c.anyHead()
		if err != nil {
			return err
		}
		if container && n > 0 {
			stack = append(stack, anyFrame{left: n, object: object})
		}
		for len(stack) > 0 && stack[len(stack)-1].left == 0 {
			stack = stack[:len(stack)-1]
		}
		if len(stack) == 0 {
			return nil
		}
		top := &stack[len(stack)-1]
		top.left--
		if top.object {
			if _, err := c.bytes(); err != nil {
				return err
			}
		}
	}
}

// anyHead takes an Any type byte and a scalar's payload; for an array or
// object it takes the entry count and returns it in n.
func (c *cursor) anyHead() (n uint64, container, object bool, err error) {
	t, err := c.byte()
	if err != nil {
		return 0, false, false, err
	}
	switch t {
	case anyUndefined, anyNull, anyFalse, anyTrue:
	case anyInt:
		err = c.varInt()
	case anyFloat32:
		err = c.skip(4)
	case anyFloat64, anyBigInt:
		err = c.skip(8)
	case anyString, anyBytes:
		_, err = c.bytes()
	case anyObject, anyArray:
		if n, err = c.uint(); err == nil && n > uint64(len(c.b)) {
			err = errShortFrame // every entry takes a byte at least
		}
		return n, true, t == anyObject, err
	default:
		err = fmt.Errorf("%w: Any type %d", errBadUpdate, t)
	}
	return 0, false, false, err
}

// checkJSON fails unless s is what JSON.parse takes (UpdateDecoderV1
// readJSON): Yjs throws on anything else, so no update holds it.
func checkJSON(s []byte) error {
	if !json.Valid(s) {
		return fmt.Errorf("%w: bad JSON %.40q", errBadUpdate, s)
	}
	return nil
}

// jsString returns s as lib0's readVarString leaves it, re-encoded:
// valid UTF-8 unchanged, else with each maximal invalid subpart replaced
// by U+FFFD, as the WHATWG decoder behind TextDecoder does. Clock units
// then count as in Yjs even for bytes no Yjs client writes.
func jsString(s []byte) []byte {
	if utf8.Valid(s) {
		return s
	}
	out := make([]byte, 0, len(s)+8)
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRune(s[i:])
		if r != utf8.RuneError || n > 1 {
			out = append(out, s[i:i+n]...)
			i += n
			continue
		}
		out = utf8.AppendRune(out, utf8.RuneError)
		i += invalidPrefix(s[i:])
	}
	return out
}

// invalidPrefix is the length of the maximal subpart at the start of s,
// which does not start with a valid rune: a lead byte and the
// continuation bytes that fit it (Unicode §3.9 "U+FFFD substitution of
// maximal subparts", the WHATWG UTF-8 decoder).
func invalidPrefix(s []byte) int {
	lo, hi := byte(0x80), byte(0xbf)
	need := 0
	switch b := s[0]; {
	case b >= 0xc2 && b <= 0xdf:
		need = 1
	case b >= 0xe0 && b <= 0xef:
		need = 2
		if b == 0xe0 {
			lo = 0xa0
		} else if b == 0xed {
			hi = 0x9f
		}
	case b >= 0xf0 && b <= 0xf4:
		need = 3
		if b == 0xf0 {
			lo = 0x90
		} else if b == 0xf4 {
			hi = 0x8f
		}
	}
	n := 1
	for ; n <= need && n < len(s) && s[n] >= lo && s[n] <= hi; n++ {
		lo, hi = 0x80, 0xbf
	}
	return n
}

// utf16Len is the JS length of valid UTF-8 s: one unit a rune, two for
// runes past U+FFFF (four-byte sequences).
func utf16Len(s []byte) uint64 {
	var n uint64
	for _, b := range s {
		switch {
		case b < 0x80 || b >= 0xc0 && b < 0xf0:
			n++
		case b >= 0xf0:
			n += 2
		}
	}
	return n
}

// utf16Split cuts valid UTF-8 s at UTF-16 offset k, as
// ContentString.splice does: a surrogate pair cut in two leaves U+FFFD in
// each half, so the lengths in units stay. A half that changes is a new
// slice; the others alias s.
func utf16Split(s []byte, k uint64) (head, tail []byte) {
	var units uint64
	for i := 0; i < len(s); {
		if units == k {
			return s[:i], s[i:]
		}
		_, n := utf8.DecodeRune(s[i:])
		if n == 4 && units+1 == k {
			return append(s[:i:i], "\uFFFD"...), append([]byte("\uFFFD"), s[i+n:]...)
		}
		units += uint64(n/4 + 1)
		i += n
	}
	return s, nil
}

// utf16Tail is valid UTF-8 s from UTF-16 offset k on (utf16Split).
func utf16Tail(s []byte, k uint64) []byte {
	_, tail := utf16Split(s, k)
	return tail
}

// readContent reads an Item's content (structs/Content*.js read*) and
// returns it in the form block.content keeps, with its length in clock
// units:
//
//	refDeleted       nothing; the length is the content
//	refJSON, refAny  the elements' wire bytes, back to back; one unit each
//	refString        the UTF-8 bytes, made valid; UTF-16 units
//	the rest         the whole wire form; one unit
func readContent(c *cursor, ref byte) ([]byte, uint64, error) {
	start := c.b
	switch ref {
	case refDeleted:
		n, err := c.uint()
		return nil, n, err
	case refJSON, refAny:
		return readElements(c, ref)
	case refString:
		s, err := c.bytes()
		if err != nil {
			return nil, 0, err
		}
		s = jsString(s)
		return s, utf16Len(s), nil
	case refBinary:
		_, err := c.bytes()
		return c.taken(start), 1, err
	case refEmbed:
		err := readJSONString(c)
		return c.taken(start), 1, err
	case refFormat:
		_, err := c.bytes()
		if err == nil {
			err = readJSONString(c)
		}
		return c.taken(start), 1, err
	case refType:
		err := readTypeRef(c)
		return c.taken(start), 1, err
	case refDoc:
		_, err := c.bytes() // guid
		if err == nil {
			err = c.skipAny() // opts
		}
		return c.taken(start), 1, err
	}
	return nil, 0, fmt.Errorf("%w: content ref %d", errBadUpdate, ref)
}

// readElements reads the count and elements of a ContentJSON (JSON
// strings, or "undefined") or a ContentAny (Any values).
func readElements(c *cursor, ref byte) ([]byte, uint64, error) {
	n, err := c.uint()
	if err != nil {
		return nil, 0, err
	}
	start := c.b
	// Every element takes a byte at least, so n iterations are bounded
	// by the bytes left.
	for i := uint64(0); i < n; i++ {
		if ref == refAny {
			err = c.skipAny()
		} else {
			err = readJSONElement(c)
		}
		if err != nil {
			return nil, 0, err
		}
	}
	return c.taken(start), n, nil
}

// readJSONElement reads one ContentJSON element: JSON, or "undefined"
// for an undefined slot (ContentJSON.js readContentJSON).
func readJSONElement(c *cursor) error {
	s, err := c.bytes()
	if err != nil || string(s) == "undefined" {
		return err
	}
	return checkJSON(s)
}

// readJSONString reads a string that Yjs JSON.parses (readJSON).
func readJSONString(c *cursor) error {
	s, err := c.bytes()
	if err != nil {
		return err
	}
	return checkJSON(s)
}

// readTypeRef reads a ContentType: the type ref, and the name of an XML
// element or hook (ContentType.js readContentType, YXmlElement.js).
func readTypeRef(c *cursor) error {
	t, err := c.uint()
	switch {
	case err != nil:
		return err
	case t >= typeRefs:
		return fmt.Errorf("%w: type ref %d", errBadUpdate, t)
	case t == typeXMLElement || t == typeXMLHook:
		_, err = c.bytes()
	}
	return err
}

// readBlock reads the struct of client at clock (updates.js
// lazyStructReaderGenerator): info 10 is a Skip, a zero ref a GC, the
// rest an Item.
func readBlock(c *cursor, client, clock uint64) (block, error) {
	info, err := c.byte()
	if err != nil {
		return block{}, err
	}
	b := block{client: client, clock: clock, ref: info & infoRef}
	switch {
	case info == refSkip:
		b.length, err = c.uint()
	case b.ref == refGC:
		b.length, err = c.uint()
	default:
		err = readItem(c, info, &b)
	}
	if err == nil && b.length > maxSafe-clock {
		err = fmt.Errorf("%w: clock past 2^53-1", errBadUpdate)
	}
	return b, err
}

// readItem reads the rest of an Item after its info byte: origins, the
// parent when there is no origin, the content.
func readItem(c *cursor, info byte, b *block) error {
	var err error
	if info&infoOrigin != 0 {
		if b.origin, err = c.id(); err != nil {
			return err
		}
		b.hasOrigin = true
	}
	if info&infoRightOrigin != 0 {
		if b.rightOrigin, err = c.id(); err != nil {
			return err
		}
		b.hasRightOrigin = true
	}
	if !b.hasOrigin && !b.hasRightOrigin {
		b.parentSub = info&infoParentSub != 0
		if b.parent, err = readParent(c, b.parentSub); err != nil {
			return err
		}
	}
	b.content, b.length, err = readContent(c, b.ref)
	return err
}

// readParent reads an Item's parent info and returns its wire bytes:
// varuint 1 and a root type's name, or anything else and the ID of the
// parent type's Item; then the map key when sub is set.
func readParent(c *cursor, sub bool) ([]byte, error) {
	start := c.b
	key, err := c.uint()
	if err != nil {
		return nil, err
	}
	if key == 1 {
		_, err = c.bytes()
	} else {
		_, err = c.id()
	}
	if err == nil && sub {
		_, err = c.bytes()
	}
	return c.taken(start), err
}

// structReader yields an update's structs in wire order, Skips included
// (updates.js LazyStructReader with filterSkips false). Once it is done,
// c holds the delete set.
type structReader struct {
	c      cursor
	chunks uint64 // chunks not yet begun
	left   uint64 // structs left in the current chunk
	client uint64
	clock  uint64 // clock of the next struct
}

// newStructReader starts reading update.
func newStructReader(update []byte) (*structReader, error) {
	r := &structReader{c: cursor{update}}
	var err error
	r.chunks, err = r.c.uint()
	return r, err
}

// next returns the next struct; ok is false after the last one.
func (r *structReader) next() (b block, ok bool, err error) {
	for r.left == 0 {
		if r.chunks == 0 {
			return block{}, false, nil
		}
		r.chunks--
		if r.left, err = r.c.uint(); err != nil {
			return block{}, false, fmt.Errorf("chunk header: %w", err)
		}
		if r.client, err = r.c.uint(); err != nil {
			return block{}, false, fmt.Errorf("chunk header: %w", err)
		}
		if r.clock, err = r.c.uint(); err != nil {
			return block{}, false, fmt.Errorf("chunk header: %w", err)
		}
	}
	if b, err = readBlock(&r.c, r.client, r.clock); err != nil {
		return block{}, false, fmt.Errorf("struct %d:%d: %w", r.client, r.clock, err)
	}
	r.left--
	r.clock = b.end()
	return b, true, nil
}

// dsRange is a range of deleted clocks of one client.
type dsRange struct{ clock, length uint64 }

// deleteSet maps a client to its deleted ranges (utils/DeleteSet.js).
// Only clients with ranges are in it.
type deleteSet map[uint64][]dsRange

// readDeleteSet reads a delete set (DeleteSet.js readDeleteSet): the
// ranges of a client listed twice are appended, in wire order.
func readDeleteSet(c *cursor) (deleteSet, error) {
	clients, err := c.uint()
	if err != nil {
		return nil, fmt.Errorf("delete set: %w", err)
	}
	ds := deleteSet{}
	// Each client takes two bytes at least and each range two more, so
	// the loops are bounded by the bytes left, whatever the counts say.
	for i := uint64(0); i < clients; i++ {
		client, err := c.uint()
		if err != nil {
			return nil, fmt.Errorf("delete set: %w", err)
		}
		n, err := c.uint()
		if err != nil {
			return nil, fmt.Errorf("delete set: %w", err)
		}
		for j := uint64(0); j < n; j++ {
			r, err := readRange(c)
			if err != nil {
				return nil, fmt.Errorf("delete set client %d: %w", client, err)
			}
			ds[client] = append(ds[client], r)
		}
	}
	return ds, nil
}

// readRange reads one clock and length of a delete set.
func readRange(c *cursor) (dsRange, error) {
	clock, err := c.uint()
	if err != nil {
		return dsRange{}, err
	}
	length, err := c.uint()
	if err == nil && length > maxSafe-clock {
		err = fmt.Errorf("%w: deleted range past 2^53-1", errBadUpdate)
	}
	return dsRange{clock, length}, err
}

// sortedClients lists the clients of ds, highest first, the order in
// which Yjs writes delete sets and state vectors.
func sortedClients[V any](m map[uint64]V) []uint64 {
	clients := make([]uint64, 0, len(m))
	for c := range m {
		clients = append(clients, c)
	}
	slices.SortFunc(clients, func(a, b uint64) int { return cmp.Compare(b, a) })
	return clients
}

// appendDeleteSet appends ds in wire form, clients highest first and
// ranges in their order (DeleteSet.js writeDeleteSet).
func appendDeleteSet(dst []byte, ds deleteSet) []byte {
	dst = appendVaruint(dst, uint64(len(ds)))
	for _, client := range sortedClients(ds) {
		dst = appendVaruint(dst, client)
		dst = appendVaruint(dst, uint64(len(ds[client])))
		for _, r := range ds[client] {
			dst = appendVaruint(dst, r.clock)
			dst = appendVaruint(dst, r.length)
		}
	}
	return dst
}

// add appends the ranges of other to ds.
func (ds deleteSet) add(other deleteSet) {
	for client, ranges := range other {
		ds[client] = append(ds[client], ranges...)
	}
}

// compact sorts each client's ranges and joins those that overlap or
// touch (DeleteSet.js sortAndMergeDeleteSet). Empty ranges, which delete
// nothing, go.
func (ds deleteSet) compact() {
	for client, ranges := range ds {
		ranges = slices.DeleteFunc(ranges, func(r dsRange) bool { return r.length == 0 })
		slices.SortFunc(ranges, func(a, b dsRange) int { return cmp.Compare(a.clock, b.clock) })
		out := ranges[:0]
		for _, r := range ranges {
			if n := len(out); n > 0 && out[n-1].clock+out[n-1].length >= r.clock {
				out[n-1].length = max(out[n-1].length, r.clock+r.length-out[n-1].clock)
				continue
			}
			out = append(out, r)
		}
		if len(out) == 0 {
			delete(ds, client)
		} else {
			ds[client] = out
		}
	}
}

// covers reports whether the compacted ranges of client hold all of
// [clock, clock+length).
func (ds deleteSet) covers(client, clock, length uint64) bool {
	if length == 0 {
		return true
	}
	ranges := ds[client]
	i, _ := slices.BinarySearchFunc(ranges, clock+1, func(r dsRange, c uint64) int { return cmp.Compare(r.clock, c) })
	return i > 0 && ranges[i-1].clock+ranges[i-1].length >= clock+length
}

// decodeUpdate reads a whole update, appending its structs to dst
// without Skips and empty structs, which carry nothing.
func decodeUpdate(update []byte, dst []block) ([]block, deleteSet, error) {
	r, err := newStructReader(update)
	if err != nil {
		return dst, nil, err
	}
	for {
		b, ok, err := r.next()
		if err != nil {
			return dst, nil, err
		}
		if !ok {
			break
		}
		if b.ref != refSkip && b.length > 0 {
			dst = append(dst, b)
		}
	}
	ds, err := readDeleteSet(&r.c)
	return dst, ds, err
}

// headBlock returns the first n clock units of b, 0 < n < b.length:
// the left half of a split (Item.js splitItem), which keeps b's origins
// and parent.
func headBlock(b block, n uint64) (block, error) {
	h := b
	h.length = n
	switch b.ref {
	case refString:
		h.content, _ = utf16Split(b.content, n)
	case refJSON, refAny:
		c := cursor{b.content}
		if err := c.skipElements(b.ref, n); err != nil {
			return block{}, err
		}
		h.content = c.taken(b.content)
	}
	return h, nil
}

// skipElements takes n elements of a ContentJSON or ContentAny.
func (c *cursor) skipElements(ref byte, n uint64) error {
	for i := uint64(0); i < n; i++ {
		var err error
		if ref == refAny {
			err = c.skipAny()
		} else {
			_, err = c.bytes()
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// sliceBlock returns b from diff clock units on (updates.js sliceStruct,
// or Item.write with an offset): an Item's part gets the unit before it
// as its origin, as a split does, and keeps the rest. diff must be below
// b.length; only GCs, Skips and refDeleted, refString, refJSON and refAny
// Items are longer than one unit.
func sliceBlock(b block, diff uint64) (block, error) {
	if diff == 0 {
		return b, nil
	}
	r := b
	r.clock += diff
	r.length -= diff
	if b.ref == refGC || b.ref == refSkip {
		return r, nil
	}
	r.origin, r.hasOrigin = yid{b.client, b.clock + diff - 1}, true
	switch b.ref {
	case refString:
		r.content = utf16Tail(b.content, diff)
	case refJSON, refAny:
		c := cursor{b.content}
		if err := c.skipElements(b.ref, diff); err != nil {
			return block{}, err
		}
		r.content = c.b
	}
	return r, nil
}

// appendBlock appends b in wire form (GC.js, Skip.js and Item.js write).
// The info byte is worked out as Yjs does: parentSub sets its bit even
// where the origin leaves the key unwritten.
func appendBlock(dst []byte, b *block) []byte {
	if b.ref == refGC || b.ref == refSkip {
		return appendVaruint(append(dst, b.ref), b.length)
	}
	info := b.ref
	if b.hasOrigin {
		info |= infoOrigin
	}
	if b.hasRightOrigin {
		info |= infoRightOrigin
	}
	if b.parentSub {
		info |= infoParentSub
	}
	dst = append(dst, info)
	if b.hasOrigin {
		dst = appendVaruint(appendVaruint(dst, b.origin.client), b.origin.clock)
	}
	if b.hasRightOrigin {
		dst = appendVaruint(appendVaruint(dst, b.rightOrigin.client), b.rightOrigin.clock)
	}
	if !b.hasOrigin && !b.hasRightOrigin {
		dst = append(dst, b.parent...)
	}
	switch b.ref {
	case refDeleted:
		return appendVaruint(dst, b.length)
	case refJSON, refAny:
		dst = appendVaruint(dst, b.length)
	case refString:
		dst = appendVaruint(dst, uint64(len(b.content)))
	}
	return append(dst, b.content...)
}

// structWriter lays structs out as updates.js LazyStructWriter does: a
// run of structs of one client is a chunk that starts at the clock of
// its first struct, the others' clocks implied.
type structWriter struct {
	done   []byte // finished chunks
	chunks uint64
	cur    []byte // structs of the open chunk
	n      uint64 // structs in cur
	client uint64 // of the open chunk
	clock  uint64 // of the open chunk's first struct
}

// write adds b, opening a chunk when the client changes.
func (w *structWriter) write(b *block) {
	if w.n > 0 && b.client != w.client {
		w.flush()
	}
	if w.n == 0 {
		w.client, w.clock = b.client, b.clock
	}
	w.cur = appendBlock(w.cur, b)
	w.n++
}

// flush closes the open chunk.
func (w *structWriter) flush() {
	if w.n == 0 {
		return
	}
	w.done = appendVaruint(w.done, w.n)
	w.done = appendVaruint(w.done, w.client)
	w.done = appendVaruint(w.done, w.clock)
	w.done = append(w.done, w.cur...)
	w.chunks++
	w.cur, w.n = w.cur[:0], 0
}

// finish appends the chunk count and the chunks to dst.
func (w *structWriter) finish(dst []byte) []byte {
	w.flush()
	return append(appendVaruint(dst, w.chunks), w.done...)
}

// decodeStateVector reads an encoded state vector (utils/encoding.js
// readStateVector): a count, then client and clock pairs; a client listed
// twice keeps its last clock. Trailing bytes are ignored, as Yjs does.
// Errors: errShortFrame, errBadUpdate for a number past 2^53-1.
func decodeStateVector(sv []byte) (map[uint64]uint64, error) {
	c := cursor{sv}
	n, err := c.uint()
	if err != nil {
		return nil, fmt.Errorf("state vector: %w", err)
	}
	if n > uint64(len(c.b)/2) {
		return nil, fmt.Errorf("state vector of %d clients: %w", n, errShortFrame)
	}
	m := make(map[uint64]uint64, n)
	for range n {
		e, err := c.id()
		if err != nil {
			return nil, fmt.Errorf("state vector: %w", err)
		}
		m[e.client] = e.clock
	}
	return m, nil
}

// encodeStateVector encodes sv as Y.encodeStateVector does: the count,
// then client and clock pairs, clients highest first.
func encodeStateVector(sv map[uint64]uint64) []byte {
	b := appendVaruint(nil, uint64(len(sv)))
	for _, client := range sortedClients(sv) {
		b = appendVaruint(appendVaruint(b, client), sv[client])
	}
	return b
}

// svCovers reports whether have has every clock of want: have[c] >=
// want[c] for every client c.
func svCovers(have, want map[uint64]uint64) bool {
	for client, clock := range want {
		if have[client] < clock {
			return false
		}
	}
	return true
}

// stateVectorFromUpdate returns the encoded state vector of update, as
// Y.encodeStateVectorFromUpdate does (updates.js
// encodeStateVectorFromUpdateV2): per client, the end of the structs that
// run from clock 0 up to the first Skip; a client whose structs start
// later is left out. Yjs's quirks stay: a run of one client is not
// checked for gaps, and an update whose very first struct is a Skip at
// clock 0 counts that Skip. Unlike Yjs it also reads the delete set, so
// that a truncated update is an error (errShortFrame, errBadUpdate).
func stateVectorFromUpdate(update []byte) ([]byte, error) {
	r, err := newStructReader(update)
	if err != nil {
		return nil, fmt.Errorf("state vector from update: %w", err)
	}
	sv := map[uint64]uint64{}
	var client, clock uint64
	stop, first := false, true
	for {
		b, ok, err := r.next()
		if err != nil {
			return nil, fmt.Errorf("state vector from update: %w", err)
		}
		if !ok {
			break
		}
		switch {
		case first:
			client, stop, first = b.client, b.clock != 0, false
			if !stop {
				clock = b.end()
			}
		case b.client != client:
			if clock != 0 {
				sv[client] = clock
			}
			client, clock, stop = b.client, 0, b.clock != 0
		}
		if b.ref == refSkip {
			stop = true
		}
		if !stop {
			clock = b.end()
		}
	}
	if clock != 0 {
		sv[client] = clock
	}
	if _, err := readDeleteSet(&r.c); err != nil {
		return nil, fmt.Errorf("state vector from update: %w", err)
	}
	return encodeStateVector(sv), nil
}

// diffUpdate returns the part of update that a peer with stateVector
// lacks, as Y.diffUpdate does (updates.js diffUpdateV2), byte for byte
// for updates that Yjs wrote: per client, from the first struct that
// reaches past the peer's clock (sliced at that clock) on, all the
// client's structs in that run, Skips after the first included; and the
// whole delete set, clients highest first. Errors: errShortFrame,
// errBadUpdate, for the update or the state vector.
func diffUpdate(update, stateVector []byte) ([]byte, error) {
	sv, err := decodeStateVector(stateVector)
	if err != nil {
		return nil, fmt.Errorf("diff update: %w", err)
	}
	r, err := newStructReader(update)
	if err != nil {
		return nil, fmt.Errorf("diff update: %w", err)
	}
	var w structWriter
	if err := diffStructs(r, sv, &w); err != nil {
		return nil, fmt.Errorf("diff update: %w", err)
	}
	ds, err := readDeleteSet(&r.c)
	if err != nil {
		return nil, fmt.Errorf("diff update: %w", err)
	}
	return appendDeleteSet(w.finish(nil), ds), nil
}

// diffStructs writes to w the structs of r that sv lacks (the struct
// loop of diffUpdateV2).
func diffStructs(r *structReader, sv map[uint64]uint64, w *structWriter) error {
	b, ok, err := r.next()
	for ok && err == nil {
		if b.ref == refSkip { // the first written struct is no Skip
			b, ok, err = r.next()
			continue
		}
		client, have := b.client, sv[b.client]
		if b.end() <= have { // read on until something new comes
			for ok && err == nil && b.client == client && b.end() <= have {
				b, ok, err = r.next()
			}
			continue
		}
		if b, err = sliceBlock(b, have-min(have, b.clock)); err != nil {
			return err
		}
		for ok && err == nil && b.client == client {
			w.write(&b)
			b, ok, err = r.next()
		}
	}
	return err
}

// mergeUpdates merges updates into one, like Y.mergeUpdates (updates.js
// mergeUpdatesV2) but smaller: per client the structs are sorted by
// clock, the clocks of a GC are cut out of any Item that another update
// gives them as (see preferGCs), the parts that an earlier struct (in
// clock order, then in the order of updates) already covers are cut off,
// gaps become Skips, and neighbouring Items are joined where Yjs would
// join them in a document (see joinable), so that typing stays a few
// Items. The delete sets are merged, sorted and compacted. Unlike Yjs,
// one update is rewritten too, and zero updates give the empty update
// [0 0]. Where two updates hold different content for one ID the first
// is kept, as applying them in turn does; Yjs clients write such updates
// (one that splits a surrogate pair keeps U+FFFD where the others keep
// the character, yjs issue #248), and Y.mergeUpdates may keep either.
// Merging a merge gives it back unchanged. Errors: errShortFrame and
// errBadUpdate, wrapped with the update's index.
func mergeUpdates(updates [][]byte) ([]byte, error) {
	var blocks []block
	ds := deleteSet{}
	for i, u := range updates {
		var d deleteSet
		var err error
		if blocks, d, err = decodeUpdate(u, blocks); err != nil {
			return nil, fmt.Errorf("merge update %d: %w", i, err)
		}
		ds.add(d)
	}
	blocks, err := preferGCs(blocks)
	if err != nil {
		return nil, fmt.Errorf("merge updates: %w", err)
	}
	// Highest client first, as Yjs writes; stable, so that the first
	// update wins where two hold the same clock.
	slices.SortStableFunc(blocks, func(a, b block) int {
		if a.client != b.client {
			return cmp.Compare(b.client, a.client)
		}
		return cmp.Compare(a.clock, b.clock)
	})
	if blocks, err = dropOverlaps(blocks); err != nil {
		return nil, fmt.Errorf("merge updates: %w", err)
	}
	blocks = joinBlocks(blocks)
	ds.compact()
	return appendDeleteSet(appendStructs(nil, blocks), ds), nil
}

// preferGCs cuts out of every Item the clocks that a GC of another
// update covers. A document keeps whichever of the two it got first, but
// a GC stands for an Item whose parent type was deleted and collected
// (Item.js gc): it is smaller, and it integrates at once, where the Item
// may wait for a parent that is gone.
func preferGCs(blocks []block) ([]block, error) {
	gcs := deleteSet{}
	for i := range blocks {
		if b := &blocks[i]; b.ref == refGC {
			gcs[b.client] = append(gcs[b.client], dsRange{b.clock, b.length})
		}
	}
	if len(gcs) == 0 {
		return blocks, nil
	}
	gcs.compact()
	out := make([]block, 0, len(blocks))
	for _, b := range blocks {
		if b.ref == refGC || len(gcs[b.client]) == 0 {
			out = append(out, b)
			continue
		}
		var err error
		if out, err = appendUncovered(out, b, gcs[b.client]); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// appendUncovered appends to out the parts of b outside the sorted,
// compacted ranges.
func appendUncovered(out []block, b block, ranges []dsRange) ([]block, error) {
	i, _ := slices.BinarySearchFunc(ranges, b.clock, func(r dsRange, clock uint64) int {
		return cmp.Compare(r.clock+r.length, clock+1)
	})
	var err error
	for ; i < len(ranges) && ranges[i].clock < b.end(); i++ {
		r := ranges[i]
		if r.clock > b.clock {
			head, err := headBlock(b, r.clock-b.clock)
			if err != nil {
				return nil, err
			}
			out = append(out, head)
		}
		if r.clock+r.length >= b.end() {
			return out, nil
		}
		if r.clock+r.length > b.clock {
			if b, err = sliceBlock(b, r.clock+r.length-b.clock); err != nil {
				return nil, err
			}
		}
	}
	return append(out, b), nil
}

// dropOverlaps removes, from blocks sorted by client and clock, every
// struct or part of one that an earlier struct covers, in place.
func dropOverlaps(blocks []block) ([]block, error) {
	out := blocks[:0]
	for _, b := range blocks {
		if n := len(out); n > 0 && out[n-1].client == b.client {
			end := out[n-1].end()
			if b.end() <= end {
				continue
			}
			if b.clock < end {
				var err error
				if b, err = sliceBlock(b, end-b.clock); err != nil {
					return nil, err
				}
				// The part has an origin, so readers ignore the map
				// key's bit that Yjs would still write; without it a
				// merge of the merge gives the same bytes.
				b.parentSub = false
			}
		}
		out = append(out, b)
	}
	return out, nil
}

// joinBlocks joins, in place, each run of neighbouring structs that
// joinable allows into one.
func joinBlocks(blocks []block) []block {
	origins := sortedOrigins(blocks)
	inList := listItems(blocks)
	out := blocks[:0]
	for i := 0; i < len(blocks); {
		j := i + 1
		for j < len(blocks) && joinable(&blocks[j-1], &blocks[j], inList[j-1], origins) {
			j++
		}
		joined := joinRun(blocks[i:j])
		out = append(out, joined)
		i = j
	}
	return out
}

// sortedOrigins lists the origin of every Item in blocks, sorted.
func sortedOrigins(blocks []block) []yid {
	var origins []yid
	for i := range blocks {
		if blocks[i].hasOrigin {
			origins = append(origins, blocks[i].origin)
		}
	}
	slices.SortFunc(origins, compareIDs)
	return origins
}

// compareIDs orders IDs by client, then clock.
func compareIDs(a, b yid) int {
	if a.client != b.client {
		return cmp.Compare(a.client, b.client)
	}
	return cmp.Compare(a.clock, b.clock)
}

// Where an Item sits, as listItems works it out.
const (
	placeUnknown = iota // not yet worked out
	placeList           // in an array, text or XML list
	placeOther          // a map entry, or not known from these blocks
	placeOnChain        // being worked out: met again, a cycle
)

// listItems reports for each of blocks (sorted by client and clock,
// without overlaps) whether it is an Item known to sit in a list, not
// in a map. Only an Item without origins has its parent on the wire;
// the others take their origin's parent and key (Item.js integrate,
// else their right origin's), so listItems follows those to an Item
// with a parent. A chain that leaves blocks, meets a GC or runs in a
// circle (hostile bytes) gives false.
func listItems(blocks []block) []bool {
	place := make([]uint8, len(blocks))
	var chain []int
	for i := range blocks {
		chain = chain[:0]
		at, result := i, uint8(placeOther)
		for place[at] == placeUnknown {
			b := &blocks[at]
			chain = append(chain, at)
			place[at] = placeOnChain
			if b.ref == refGC {
				break
			}
			if !b.hasOrigin && !b.hasRightOrigin {
				if !b.parentSub {
					result = placeList
				}
				break
			}
			next := b.rightOrigin
			if b.hasOrigin {
				next = b.origin
			}
			if at = findBlock(blocks, next); at < 0 {
				break
			}
		}
		if len(chain) == 0 || at >= 0 && place[at] != placeOnChain && place[at] != placeUnknown {
			result = place[at]
		}
		for _, c := range chain {
			place[c] = result
		}
	}
	inList := make([]bool, len(blocks))
	for i, p := range place {
		inList[i] = p == placeList
	}
	return inList
}

// findBlock returns the index of the struct in blocks (sorted by client,
// highest first, then clock) that holds id, or -1.
func findBlock(blocks []block, id yid) int {
	i, _ := slices.BinarySearchFunc(blocks, id, func(b block, id yid) int {
		if b.client != id.client {
			return cmp.Compare(id.client, b.client)
		}
		return cmp.Compare(b.clock, id.clock+1)
	})
	// blocks[i-1] is the last struct of id's client at or before id.
	if i == 0 || blocks[i-1].client != id.client || blocks[i-1].end() <= id.clock {
		return -1
	}
	return i - 1
}

// joinable reports whether r can join l, the struct before it, as
// Item.mergeWith and GC.mergeWith join structs in a document: GCs
// always; Items when r continues l's clocks, r's origin is l's last ID,
// both have the same right origin and content that can grow (deleted,
// JSON, string, Any). A document merges only Items that are neighbours
// in their list; here, without one, r is known to follow l directly when
// no other Item names r's origin as its own: then Yjs places r right
// after l whatever else it holds, and a later split of the joined Item
// gives r's ID, origin and right origin back. Map entries join only when
// deleted: a new value deletes the one before it as it integrates (its
// left), which a joined Item would not. lInList tells whether l is known
// to sit in a list (listItems).
func joinable(l, r *block, lInList bool, origins []yid) bool {
	if l.client != r.client || l.end() != r.clock || l.ref != r.ref {
		return false
	}
	switch l.ref {
	case refGC:
		return true
	case refDeleted:
	case refJSON, refString, refAny:
		if !lInList {
			return false
		}
	default:
		return false
	}
	return r.hasOrigin && r.origin == yid{l.client, l.end() - 1} &&
		l.hasRightOrigin == r.hasRightOrigin && l.rightOrigin == r.rightOrigin &&
		namedOnce(origins, r.origin)
}

// namedOnce reports whether id is in the sorted origins exactly once.
func namedOnce(origins []yid, id yid) bool {
	i, found := slices.BinarySearchFunc(origins, id, compareIDs)
	return found && (i+1 == len(origins) || origins[i+1] != id)
}

// joinRun makes one struct of a run that joinable allows: the first's
// fields, the length and content of all (ContentString.mergeWith and the
// others: contents end to end).
func joinRun(run []block) block {
	b := run[0]
	if len(run) == 1 {
		return b
	}
	size := 0
	for i := range run[1:] {
		b.length += run[i+1].length
		size += len(run[i+1].content)
	}
	if size > 0 {
		content := make([]byte, 0, len(b.content)+size)
		for i := range run {
			content = append(content, run[i].content...)
		}
		b.content = content
	}
	return b
}

// appendStructs appends the struct part of an update: blocks, sorted by
// client and clock without overlaps, with a Skip in every gap between
// two structs of a client.
func appendStructs(dst []byte, blocks []block) []byte {
	var w structWriter
	for i := range blocks {
		b := &blocks[i]
		if i > 0 && blocks[i-1].client == b.client && blocks[i-1].end() < b.clock {
			gap := blocks[i-1].end()
			w.write(&block{client: b.client, clock: gap, length: b.clock - gap, ref: refSkip})
		}
		w.write(b)
	}
	return w.finish(dst)
}

// updateIsEmpty reports whether update decodes and carries nothing: no
// struct but Skips and no deleted clock. An update that does not decode
// is not empty.
func updateIsEmpty(update []byte) bool {
	blocks, ds, err := decodeUpdate(update, nil)
	if err != nil || len(blocks) > 0 {
		return false
	}
	ds.compact()
	return len(ds) == 0
}

// updateCovers reports whether applying other after have would change
// nothing: every clock of every struct in other is a clock of a struct
// in have (Skips aside), and every clock that other deletes is deleted in
// have, by its delete set or as a GC or deleted-content struct. Struct
// contents are not compared: an ID names one content (but for U+FFFD
// where a client split a surrogate pair). It is exact where have's
// clocks have gaps (pending structs), unlike a state vector. A deletion
// that Yjs works out as it integrates (an Item in a deleted type, the
// older value of a map key) counts only where have records it, so the
// answer can be a false no, never a false yes. Errors: either update
// fails to decode.
func updateCovers(have, other []byte) (bool, error) {
	hb, hds, err := decodeUpdate(have, nil)
	if err != nil {
		return false, fmt.Errorf("update covers: have: %w", err)
	}
	ob, ods, err := decodeUpdate(other, nil)
	if err != nil {
		return false, fmt.Errorf("update covers: other: %w", err)
	}
	present := deleteSet{}
	for i := range hb {
		b := &hb[i]
		present[b.client] = append(present[b.client], dsRange{b.clock, b.length})
		if b.ref == refGC || b.ref == refDeleted {
			hds[b.client] = append(hds[b.client], dsRange{b.clock, b.length})
		}
	}
	present.compact()
	hds.compact()
	for i := range ob {
		if !present.covers(ob[i].client, ob[i].clock, ob[i].length) {
			return false, nil
		}
	}
	for client, ranges := range ods {
		for _, r := range ranges {
			if !hds.covers(client, r.clock, r.length) {
				return false, nil
			}
		}
	}
	return true, nil
}

// appendServerFrame appends one final, unmasked frame of opcode holding
// payload to b, as a server sends it (RFC 6455 §5.2: FIN and opcode, then
// a 7-bit length, or 126 and a 16-bit one, or 127 and a 64-bit one, big
// endian; no mask).
func appendServerFrame(b []byte, opcode byte, payload []byte) []byte {
	return append(appendServerHeader(b, opcode, len(payload)), payload...)
}

// appendServerHeader appends the header of a final, unmasked frame of
// opcode with a payload of n bytes (see appendServerFrame).
func appendServerHeader(b []byte, opcode byte, n int) []byte {
	b = append(b, 0x80|opcode)
	switch {
	case n < 126:
		return append(b, byte(n))
	case n <= 0xffff:
		return binary.BigEndian.AppendUint16(append(b, 126), uint16(n))
	default:
		return binary.BigEndian.AppendUint64(append(b, 127), uint64(n))
	}
}

// maxFrameHeader is the longest frame header, in bytes: 2, an 8-byte
// length and a 4-byte masking key (RFC 6455 §5.2).
const maxFrameHeader = 14

// frameHeaderLen is the length in bytes of a frame header whose second
// byte is second: 2, plus 2 or 8 for an extended payload length, plus 4
// for a masking key (RFC 6455 §5.2).
func frameHeaderLen(second byte) int {
	n := 2
	switch second & 0x7f {
	case 126:
		n += 2
	case 127:
		n += 8
	}
	if second&0x80 != 0 {
		n += 4
	}
	return n
}

// frameHeader is one decoded frame header (RFC 6455 §5.2).
type frameHeader struct {
	fin    bool
	opcode byte
	masked bool
	size   int     // payload length in bytes; -1: more than an int holds
	mask   [4]byte // the masking key, when masked
}

// parseFrameHeader decodes hdr, a whole frame header: frameHeaderLen(hdr[1])
// bytes. Errors: errProtocol when hdr is shorter than that.
func parseFrameHeader(hdr []byte) (frameHeader, error) {
	if len(hdr) < 2 || len(hdr) < frameHeaderLen(hdr[1]) {
		return frameHeader{}, fmt.Errorf("%w: short frame header", errProtocol)
	}
	h := frameHeader{fin: hdr[0]&0x80 != 0, opcode: hdr[0] & 0x0f, masked: hdr[1]&0x80 != 0}
	rest := hdr[2:]
	switch n := hdr[1] & 0x7f; n {
	case 126:
		h.size, rest = int(binary.BigEndian.Uint16(rest)), rest[2:]
	case 127:
		size := binary.BigEndian.Uint64(rest)
		rest = rest[8:]
		h.size = -1
		if size <= math.MaxInt {
			h.size = int(size)
		}
	default:
		h.size = int(n)
	}
	if h.masked {
		copy(h.mask[:], rest)
	}
	return h, nil
}

// maskBytes applies a masking key to b, whose first byte is byte pos of
// the payload, in place; applied twice it gives the bytes back (RFC 6455
// §5.3: byte i is XORed with key[i mod 4]). Eight bytes at a time: the
// key's pattern repeats every 4.
func maskBytes(key [4]byte, pos int, b []byte) {
	i := 0
	if len(b) >= 8 {
		var k [8]byte
		for j := range k {
			k[j] = key[(pos+j)&3]
		}
		word := binary.LittleEndian.Uint64(k[:])
		for ; i+8 <= len(b); i += 8 {
			binary.LittleEndian.PutUint64(b[i:], binary.LittleEndian.Uint64(b[i:])^word)
		}
	}
	for ; i < len(b); i++ {
		b[i] ^= key[(pos+i)&3]
	}
}
