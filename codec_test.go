package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestReadVaruint(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want uint64
		n    int
		err  error
	}{
		{"zero", "00", 0, 1, nil},
		{"one byte", "05", 5, 1, nil},
		{"largest one byte", "7f", 127, 1, nil},
		{"two bytes", "80 01", 128, 2, nil},
		{"200", "c8 01", 200, 2, nil},
		{"trailing bytes ignored", "05 ff", 5, 1, nil},
		{"max uint64", "ff ff ff ff ff ff ff ff ff 01", math.MaxUint64, 10, nil},
		{"empty", "", 0, 0, errShortFrame},
		{"truncated", "80", 0, 0, errShortFrame},
		{"truncated long", "ff ff ff", 0, 0, errShortFrame},
		{"overflow in tenth byte", "ff ff ff ff ff ff ff ff ff 02", 0, 0, errOverflow},
		{"eleven bytes", "ff ff ff ff ff ff ff ff ff ff 01", 0, 0, errOverflow},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, n, err := readVaruint(unhex(t, tt.in))
			if got != tt.want || n != tt.n || !errors.Is(err, tt.err) {
				t.Errorf("got %d, %d, %v; want %d, %d, %v", got, n, err, tt.want, tt.n, tt.err)
			}
		})
	}
}

func TestAppendVaruint(t *testing.T) {
	tests := []struct {
		in   uint64
		want string
	}{
		{0, "00"},
		{127, "7f"},
		{128, "8001"},
		{200, "c801"},
		{300, "ac02"},
		{math.MaxUint64, "ffffffffffffffffff01"},
	}
	for _, tt := range tests {
		if got := hex.EncodeToString(appendVaruint(nil, tt.in)); got != tt.want {
			t.Errorf("appendVaruint(%d) = %s, want %s", tt.in, got, tt.want)
		}
	}
}

// The golden vectors come from the original Python service.
func TestIDPrefixGolden(t *testing.T) {
	long := strings.Repeat("x", 200)
	tests := []struct {
		name  string
		magic idMagic
		doc   string
		msg   string
		want  string
	}{
		{"doc-a", magicSeed, "doc-a", "00 02 03 01 02 03", "02 00 05 64 6f 63 2d 61 00 02 03 01 02 03"},
		{"200 characters", magicSeed, long, "01 00", "02 00 c8 01" + hex.EncodeToString([]byte(long)) + "01 00"},
		{"non-ASCII", magicSeed, "Grüße", "00 00 01 00", "02 00 07 47 72 c3 bc c3 9f 65 00 00 01 00"},
		{"mid-2025 magic", magicASCII, "doc-a", "03", "49 44 05 64 6f 63 2d 61 03"},
		{"empty id", magicSeed, "", "03", "02 00 00 03"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			msg := unhex(t, tt.msg)
			want := unhex(t, tt.want)
			got := append(appendIDPrefix(nil, tt.magic, tt.doc), msg...)
			if !bytes.Equal(got, want) {
				t.Fatalf("encode: got % x, want % x", got, want)
			}
			doc, rest, err := splitIDFrame(tt.magic, got)
			if err != nil || doc != tt.doc || !bytes.Equal(rest, msg) {
				t.Errorf("decode: got %q, % x, %v; want %q, % x, nil", doc, rest, err, tt.doc, msg)
			}
		})
	}
}

func TestSplitIDFrameErrors(t *testing.T) {
	tests := []struct {
		name string
		in   string
		err  error
	}{
		{"empty", "", errNoIDPrefix},
		{"one byte", "02", errNoIDPrefix},
		{"wrong magic", "49 44 01 61 00", errNoIDPrefix},
		{"plain sync message", "00 00 01 00", errNoIDPrefix},
		{"no length", "02 00", errShortFrame},
		{"length beyond frame", "02 00 05 61 62", errShortFrame},
		{"truncated length", "02 00 80", errShortFrame},
		{"length near 2^64", "02 00 ff ff ff ff ff ff ff ff ff 01 61", errShortFrame},
		{"overlong length", "02 00 ff ff ff ff ff ff ff ff ff ff 01", errOverflow},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := splitIDFrame(magicSeed, unhex(t, tt.in))
			if !errors.Is(err, tt.err) {
				t.Errorf("got %v, want %v", err, tt.err)
			}
		})
	}
}

func TestMessageKind(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want uint64
		err  error
	}{
		{"step 1, empty state vector", "00 00 01 00", msgSync, nil},
		{"empty step 2", "00 01 02 00 00", msgSync, nil},
		{"update", "00 02 03 01 02 03", msgSync, nil},
		{"update with trailing bytes", "00 02 01 00 ff", msgSync, nil},
		{"awareness", "01 03 01 02 03", msgAwareness, nil},
		{"auth", "02 00 02 6f 6b", msgAuth, nil},
		{"query awareness", "03", msgQueryAwareness, nil},
		{"empty", "", 0, errEmptyMsg},
		{"unknown type", "07 00", 7, errUnknownType},
		{"unknown sync subtype", "00 03 00", msgSync, errUnknownType},
		{"sync without subtype", "00", msgSync, errShortFrame},
		{"sync without payload", "00 02", msgSync, errShortFrame},
		{"update longer than frame", "00 02 05 01", msgSync, errShortFrame},
		{"update length near 2^64", "00 02 ff ff ff ff ff ff ff ff ff 01", msgSync, errShortFrame},
		{"awareness truncated", "01 80", msgAwareness, errShortFrame},
		{"auth truncated", "02 00", msgAuth, errShortFrame},
		{"overlong type", "ff ff ff ff ff ff ff ff ff ff 00", 0, errOverflow},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := messageKind(unhex(t, tt.in))
			if !errors.Is(err, tt.err) || (err == nil && got != tt.want) {
				t.Errorf("got %d, %v; want %d, %v", got, err, tt.want, tt.err)
			}
		})
	}
}

func TestParseIDMagic(t *testing.T) {
	for _, s := range []string{"0200", "4944"} {
		m, err := parseIDMagic(s)
		if err != nil || m.String() != s {
			t.Errorf("parseIDMagic(%q) = %v, %v; want %s", s, m, err, s)
		}
	}
	for _, s := range []string{"", "02", "0201", "zz00", "020000"} {
		if _, err := parseIDMagic(s); err == nil {
			t.Errorf("parseIDMagic(%q): want an error", s)
		}
	}
}

func FuzzReadVaruint(f *testing.F) {
	for _, s := range []string{"00", "7f", "8001", "c801", "ffffffffffffffffff01", "80", "ffffffffffffffffff02"} {
		f.Add(unhex(f, s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		v, n, err := readVaruint(b)
		if err != nil {
			return
		}
		if n < 1 || n > len(b) || n > maxVaruintLen {
			t.Fatalf("n = %d for % x", n, b)
		}
		// Re-encoding gives the canonical form, which decodes to the same value.
		again, m, err := readVaruint(appendVaruint(nil, v))
		if err != nil || again != v || m > n {
			t.Fatalf("round trip of %d: got %d (%d bytes), %v", v, again, m, err)
		}
	})
}

func FuzzSplitIDFrame(f *testing.F) {
	f.Add(unhex(f, "02 00 05 64 6f 63 2d 61 00 02 03 01 02 03"))
	f.Add(unhex(f, "02 00 07 47 72 c3 bc c3 9f 65 00 00 01 00"))
	f.Add(append(appendIDPrefix(nil, magicSeed, strings.Repeat("x", 200)), 1, 0))
	f.Add(unhex(f, "02 00 ff ff ff ff ff ff ff ff ff 01 61"))
	f.Add(unhex(f, "00 00 01 00"))
	f.Fuzz(func(t *testing.T, frame []byte) {
		doc, msg, err := splitIDFrame(magicSeed, frame)
		if err != nil {
			return
		}
		// A canonical prefix re-encodes to the same bytes; a non-canonical
		// (padded) varuint decodes to the same document either way.
		again := append(appendIDPrefix(nil, magicSeed, doc), msg...)
		doc2, msg2, err := splitIDFrame(magicSeed, again)
		if err != nil || doc2 != doc || !bytes.Equal(msg2, msg) {
			t.Fatalf("round trip of % x: got %q % x %v", frame, doc2, msg2, err)
		}
		if len(again) == len(frame) && !bytes.Equal(again, frame) {
			t.Fatalf("re-encoded % x, want % x", again, frame)
		}
	})
}

func FuzzMessageKind(f *testing.F) {
	for _, s := range []string{"00 00 01 00", "00 01 02 00 00", "00 02 03 01 02 03", "01 03 01 02 03", "03", "02 00 02 6f 6b", "00 02 ff ff ff ff ff ff ff ff ff 01"} {
		f.Add(unhex(f, s))
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		kind, err := messageKind(msg)
		if err != nil {
			return
		}
		first, _, verr := readVaruint(msg)
		if verr != nil || first != kind || kind > msgQueryAwareness {
			t.Fatalf("messageKind(% x) = %d, but the type varuint is %d, %v", msg, kind, first, verr)
		}
	})
}

// manyClients is an awareness message with n clients.
func manyClients(n int) []byte {
	var entries []any
	for i := range n {
		entries = append(entries, i, 1, "{}")
	}
	return awarenessMsg(entries...)
}

func TestReadAwareness(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		want []awarenessEntry
		err  error
	}{
		{"one client", awarenessMsg(7, 1, `{"user":{"name":"ada"}}`), []awarenessEntry{{7, 1, false}}, nil},
		{"two clients, one gone", awarenessMsg(300, 5, `{}`, 9, 2, "null"), []awarenessEntry{{300, 5, false}, {9, 2, true}}, nil},
		{"none", awarenessMsg(), nil, nil},
		{"empty state", awarenessMsg(1, 1, ""), []awarenessEntry{{1, 1, false}}, nil},
		{"golden bytes", unhex(t, "01 09 01 b9 60 03 04 6e 75 6c 6c"), []awarenessEntry{{12345, 3, true}}, nil},
		{"not awareness", unhex(t, "00 00 01 00"), nil, errUnknownType},
		{"count beyond bytes", unhex(t, "01 04 05 01 01 00"), nil, errShortFrame},
		{"count near 2^64", unhex(t, "01 0b ff ff ff ff ff ff ff ff ff 01 00"), nil, errShortFrame},
		{"state longer than update", unhex(t, "01 05 01 01 01 09 6e"), nil, errShortFrame},
		{"truncated clock", unhex(t, "01 04 01 01 80 80"), nil, errShortFrame},
		{"update longer than message", unhex(t, "01 09 01"), nil, errShortFrame},
		{"too many entries", manyClients(maxAwarenessEntries + 1), nil, errTooManyEntries},
		{"as many entries as allowed", manyClients(maxAwarenessEntries), nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := readAwareness(tt.in, nil)
			if tt.want == nil && err == nil {
				return // only the count matters
			}
			if !errors.Is(err, tt.err) || (err == nil && !slices.Equal(got, tt.want)) {
				t.Errorf("got %v, %v; want %v, %v", got, err, tt.want, tt.err)
			}
		})
	}
}

func TestAppendAwarenessGone(t *testing.T) {
	msg := appendAwarenessGone(nil, []awarenessEntry{{12345, 2, false}, {7, 9, false}})
	if want := awarenessMsg(12345, 3, "null", 7, 10, "null"); !bytes.Equal(msg, want) {
		t.Fatalf("got % x, want % x", msg, want)
	}
	if kind, err := messageKind(msg); err != nil || kind != msgAwareness {
		t.Errorf("messageKind: %d, %v", kind, err)
	}
	got, err := readAwareness(msg, nil)
	if want := []awarenessEntry{{12345, 3, true}, {7, 10, true}}; err != nil || !slices.Equal(got, want) {
		t.Errorf("decoded %v, %v; want %v", got, err, want)
	}
}

func FuzzReadAwareness(f *testing.F) {
	f.Add(awarenessMsg(7, 1, `{"user":{"name":"ada"}}`))
	f.Add(awarenessMsg(300, 5, `{}`, 9, 2, "null"))
	f.Add(unhex(f, "01 0b ff ff ff ff ff ff ff ff ff 01 00"))
	f.Add(unhex(f, "01 05 01 01 01 09 6e"))
	f.Fuzz(func(t *testing.T, msg []byte) {
		entries, err := readAwareness(msg, nil)
		if err != nil {
			return
		}
		if _, err := messageKind(msg); err != nil {
			t.Fatalf("readAwareness accepted % x, messageKind says %v", msg, err)
		}
		if len(entries) > len(msg)/minAwarenessEntry {
			t.Fatalf("%d entries from %d bytes", len(entries), len(msg))
		}
		// Marking them gone gives a message that decodes to the same clients.
		gone, err := readAwareness(appendAwarenessGone(nil, entries), nil)
		if err != nil || len(gone) != len(entries) {
			t.Fatalf("gone message: %v, %d entries, want %d", err, len(gone), len(entries))
		}
		for i, e := range gone {
			if e.client != entries[i].client || !e.gone || (entries[i].clock < math.MaxUint64 && e.clock != entries[i].clock+1) {
				t.Fatalf("entry %d: got %+v for %+v", i, e, entries[i])
			}
		}
	})
}

// FuzzCheckUpstream runs the whole decoding of an upstream frame as the
// upstream reader does: prefix, envelope, awareness. It must never panic,
// and what it accepts must re-encode to the same frame.
func FuzzCheckUpstream(f *testing.F) {
	f.Add(unhex(f, "02 00 05 64 6f 63 2d 61 00 02 03 01 02 03"))
	f.Add(append(appendIDPrefix(nil, magicSeed, "Grüße"), awarenessMsg(7, 1, "{}")...))
	f.Add(append(appendIDPrefix(nil, magicSeed, "d"), 0x01, 0x0b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x00))
	f.Add(unhex(f, "02 00 ff ff ff ff ff ff ff ff ff 01 61"))
	f.Fuzz(func(t *testing.T, data []byte) {
		fr, err := checkUpstream(magicSeed, data)
		if err != nil {
			return
		}
		if got := append(appendIDPrefix(nil, magicSeed, fr.doc), fr.data...); len(got) == len(data) && !bytes.Equal(got, data) {
			t.Fatalf("re-encoded % x, want % x", got, data)
		}
		if fr.kind == msgAwareness {
			if entries, _ := readAwareness(fr.data, nil); !slices.Equal(entries, fr.aware) {
				t.Fatalf("awareness entries %v, want %v", fr.aware, entries)
			}
		}
	})
}

func TestParseCloseAndEcho(t *testing.T) {
	tests := []struct {
		name    string
		payload []byte
		code    int
		reason  string
		echo    int
		err     error
	}{
		{"no status", nil, 1005, "", closeNormal, nil},
		{"normal", []byte{0x03, 0xe8}, 1000, "", 1000, nil},
		{"going away with reason", []byte{0x03, 0xe9, 'b', 'y', 'e'}, 1001, "bye", 1001, nil},
		{"too big", []byte{0x03, 0xf1}, 1009, "", 1009, nil},
		{"private", []byte{0x0f, 0xa0}, 4000, "", 4000, nil},
		{"reserved 1006 is not echoed", []byte{0x03, 0xee}, 1006, "", closeNormal, nil},
		{"unassigned 2000 is not echoed", []byte{0x07, 0xd0}, 2000, "", closeNormal, nil},
		{"one byte", []byte{0x03}, 0, "", 0, errProtocol},
		{"reason not UTF-8", []byte{0x03, 0xe8, 0xff}, 0, "", 0, errProtocol},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pc, err := parseClose(tt.payload)
			if !errors.Is(err, tt.err) {
				t.Fatalf("got error %v, want %v", err, tt.err)
			}
			if err != nil {
				return
			}
			if pc.code != tt.code || pc.reason != tt.reason || echoCode(pc.code) != tt.echo {
				t.Errorf("got %d %q echo %d; want %d %q echo %d", pc.code, pc.reason, echoCode(pc.code), tt.code, tt.reason, tt.echo)
			}
		})
	}
}

// FuzzParseClose checks that any close payload decodes without a panic
// and that a decoded one re-encodes to the same bytes.
func FuzzParseClose(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0x03, 0xe8})
	f.Add([]byte{0x0f, 0xa0, 'b', 'y', 'e'})
	f.Fuzz(func(t *testing.T, payload []byte) {
		pc, err := parseClose(payload)
		if err != nil || len(payload) == 0 {
			return
		}
		again := append([]byte{byte(pc.code >> 8), byte(pc.code)}, pc.reason...)
		if !bytes.Equal(again, payload) {
			t.Errorf("% x decoded to %d %q", payload, pc.code, pc.reason)
		}
		if c := echoCode(pc.code); c < 1000 || c > 4999 || c == 1005 || c == 1006 {
			t.Errorf("echo code %d may not be sent", c)
		}
	})
}

func TestClassifyFrame(t *testing.T) {
	tests := []struct {
		name    string
		fin     bool
		opcode  byte
		size    int
		control bool
		err     error
	}{
		{"binary", true, opBinary, 10, false, nil},
		{"binary at the limit", true, opBinary, 100, false, nil},
		{"binary over the limit", true, opBinary, 101, false, errTooLarge},
		{"text", true, opText, 3, false, errTextFrame},
		{"first fragment", false, opBinary, 3, false, errFragmented},
		{"continuation", true, opContinuation, 3, false, errFragmented},
		{"reserved data opcode", true, 0x3, 0, false, errProtocol},
		{"ping", true, opPing, 125, true, nil},
		{"ping over 125 bytes", true, opPing, 126, true, errProtocol},
		{"fragmented pong", false, opPong, 0, true, errProtocol},
		{"close", true, opClose, 2, true, nil},
		{"reserved control opcode", true, 0xb, 0, true, errProtocol},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			control, err := classifyFrame(tt.fin, tt.opcode, tt.size, 100)
			if control != tt.control || !errors.Is(err, tt.err) {
				t.Errorf("got %v, %v; want %v, %v", control, err, tt.control, tt.err)
			}
		})
	}
}

// Yjs update golden vectors, written by yjs 13.6.33: client 1 types "ab"
// into Y.Text "t", then "c", deletes "a", then inserts "😀" in bold
// (four updates), and what Yjs makes of them.
const (
	goldenText1 = "010101000401017402616200"
	goldenText2 = "01010102840101016300"
	goldenText3 = "000101010001"
	goldenText4 = "01030103c60101010204626f6c640474727565c40103010204f09f9880c60105010204626f6c64046e756c6c00"
	// Y.mergeUpdates of the four: "ab" and "c" stay two Items.
	goldenTextMerged = "01050100040101740261628401010163c60101010204626f6c640474727565c40103010204f09f9880c60105010204626f6c64046e756c6c0101010001"
	// Y.diffUpdate(merged, {1: 5}): the emoji cut after its first UTF-16
	// unit, its second half U+FFFD.
	goldenTextDiff5 = "01020105c40104010203efbfbdc60105010204626f6c64046e756c6c0101010001"
	// Y.diffUpdate(merged, {1: 1}).
	goldenTextDiff1 = "0105010184010001628401010163c60101010204626f6c640474727565c40103010204f09f9880c60105010204626f6c64046e756c6c0101010001"
	// One transaction of client 2 setting Y.Map "m" to an int, a float, a
	// string, an object, binary, a Y.Array, a Y.XmlElement, a subdocument
	// and a bigint.
	goldenMap = "010902002801016d016e017d012801016d0166017c3fc000002801016d0173017701782801016d016f017601016175037d017e782301016d01620201022701016d03617272002701016d01780301702901016d0164016776002801016d03626967017a000001000000000000"
	// An embed, a format and Any elements (three updates of client 2).
	goldenEmbed  = "01010209050101740b7b22696d67223a2261227d00"
	goldenFormat = "0102020a46020904626f6c64047472756586020904626f6c64046e756c6c00"
	goldenAny    = "0101020c08000205037d017d027d0300"
)

// goldenText is the four text updates.
func goldenText(t testing.TB) [][]byte {
	t.Helper()
	return [][]byte{unhex(t, goldenText1), unhex(t, goldenText2), unhex(t, goldenText3), unhex(t, goldenText4)}
}

// testUpdate encodes blocks, sorted by client and clock, and the delete
// set ds as an update, Skips in the gaps.
func testUpdate(ds deleteSet, blocks ...block) []byte {
	return appendDeleteSet(appendStructs(nil, blocks), ds)
}

// rootParent is the wire parent info of a root type name.
func rootParent(name string) []byte {
	return append(appendVaruint([]byte{1}, uint64(len(name))), name...)
}

// textBlock is a ContentString Item; origin and right may be nil.
func textBlock(client, clock uint64, origin, right *yid, s string) block {
	b := block{client: client, clock: clock, ref: refString, content: []byte(s), length: utf16Len([]byte(s))}
	setOrigins(&b, origin, right)
	return b
}

// setOrigins sets b's origins; with neither, b gets the root "t" as parent.
func setOrigins(b *block, origin, right *yid) {
	if origin != nil {
		b.origin, b.hasOrigin = *origin, true
	}
	if right != nil {
		b.rightOrigin, b.hasRightOrigin = *right, true
	}
	if origin == nil && right == nil {
		b.parent = rootParent("t")
	}
}

// blocksOf decodes update, failing the test on an error.
func blocksOf(t testing.TB, update []byte) ([]block, deleteSet) {
	t.Helper()
	blocks, ds, err := decodeUpdate(update, nil)
	if err != nil {
		t.Fatalf("decode %x: %v", update, err)
	}
	return blocks, ds
}

func TestStateVectorFromUpdate(t *testing.T) {
	skipGap := testUpdate(nil,
		textBlock(5, 0, nil, nil, "ab"),
		textBlock(5, 4, &yid{5, 1}, nil, "c"))
	late := testUpdate(nil, textBlock(6, 3, nil, nil, "ab"), textBlock(5, 0, nil, nil, "xyz"))
	tests := []struct {
		name string
		in   string
		want string
		err  error
	}{
		{"yjs merge", goldenTextMerged, "010107", nil},
		{"delete set only", goldenText3, "00", nil},
		{"empty update", "0000", "00", nil},
		{"map transaction", goldenMap, "010209", nil},
		{"stops at a Skip", hex.EncodeToString(skipGap), "010502", nil},
		{"leaves out a client that starts late", hex.EncodeToString(late), "010503", nil},
		{"leading Skip at 0 counts, as in Yjs", "01020500 0a03 0401017402616200", "010503", nil},
		{"empty", "", "", errShortFrame},
		{"truncated struct", goldenText1[:16], "", errShortFrame},
		{"truncated delete set", goldenTextMerged[:len(goldenTextMerged)-2], "", errShortFrame},
		{"unknown content ref", "0101010011 010174 00", "", errBadUpdate},
		{"Skip ref with flags", "010101008a 000100 00", "", errBadUpdate},
		{"bad type ref", "0101010007 01017407 00", "", errBadUpdate},
		{"embed", "0101010005 010174 027b7d 00", "010101", nil},
		{"bad JSON embed", "0101010005 010174 017b 00", "", errBadUpdate},
		{"bad Any type", "0101010008 010174 01 10 00", "", errBadUpdate},
		{"clock past 2^53", "010101 ffffffffffffff0f 00 05 00", "", errBadUpdate},
		{"client past 2^53", "0101 ffffffffffffffff01 00 0005 00", "", errBadUpdate},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := stateVectorFromUpdate(unhex(t, tt.in))
			if !errors.Is(err, tt.err) || hex.EncodeToString(got) != strings.ReplaceAll(tt.want, " ", "") {
				t.Errorf("got %x, %v; want %s, %v", got, err, tt.want, tt.err)
			}
		})
	}
}

func TestDiffUpdate(t *testing.T) {
	merged := goldenTextMerged
	tests := []struct {
		name   string
		update string
		sv     string
		want   string
		err    error
	}{
		{"empty state vector: all", merged, "00", merged, nil},
		{"cuts inside an Item", merged, "010101", goldenTextDiff1, nil},
		{"cuts a surrogate pair", merged, "010105", goldenTextDiff5, nil},
		{"everything known: the delete set", merged, "010107", "000101010001", nil},
		{"other clients only", goldenMap, "010107", goldenMap, nil},
		{"map, all known", goldenMap, "010209", "0000", nil},
		{"Any elements cut", goldenAny, "01020d", "0101020d88020c027d027d0300", nil},
		{"state vector truncated", merged, "0201", "", errShortFrame},
		{"state vector empty", merged, "", "", errShortFrame},
		{"update truncated", merged[:20], "00", "", errShortFrame},
		{"update garbage", "010101001f 010174 00", "00", "", errBadUpdate},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := diffUpdate(unhex(t, tt.update), unhex(t, tt.sv))
			if !errors.Is(err, tt.err) || hex.EncodeToString(got) != tt.want {
				t.Errorf("got %x, %v; want %s, %v", got, err, tt.want, tt.err)
			}
		})
	}
}

func TestMergeUpdates(t *testing.T) {
	a := textBlock(1, 0, nil, nil, "a")
	b := textBlock(1, 1, &yid{1, 0}, nil, "b")
	c := textBlock(1, 2, &yid{1, 1}, nil, "c")
	abc := textBlock(1, 0, nil, nil, "abc")
	// x of client 2 also follows a: a concurrent insertion at b's place.
	x := textBlock(2, 0, &yid{1, 0}, nil, "x")
	bRight := textBlock(1, 1, &yid{1, 0}, &yid{2, 0}, "b")
	anyB := b
	anyB.ref, anyB.content = refAny, []byte{0x77, 0x01, 0x62}
	typeB := b
	typeB.ref, typeB.content = refType, []byte{0x00}
	gc := func(clock, n uint64) block { return block{client: 1, clock: clock, length: n, ref: refGC} }
	del := func(clock, n uint64, origin *yid) block {
		b := block{client: 1, clock: clock, length: n, ref: refDeleted}
		setOrigins(&b, origin, nil)
		return b
	}
	// Two values of key "k" in Y.Map "m": the second deletes the first as
	// it integrates, so they stay apart unless both are deleted already.
	mapValue := func(clock uint64, ref byte, content []byte, origin *yid) block {
		b := block{client: 1, clock: clock, length: 1, ref: ref, content: content}
		if origin != nil {
			b.origin, b.hasOrigin = *origin, true
		} else {
			b.parent, b.parentSub = append(rootParent("m"), 1, 'k'), true
		}
		return b
	}
	v1 := mapValue(0, refAny, []byte{anyInt, 1}, nil)
	v2 := mapValue(1, refAny, []byte{anyInt, 2}, &yid{1, 0})
	d1 := mapValue(0, refDeleted, nil, nil)
	d2 := mapValue(1, refDeleted, nil, &yid{1, 0})
	d12 := d1
	d12.length = 2
	// Hostile: two Items that name each other as origin.
	loop1 := textBlock(1, 0, &yid{1, 1}, nil, "p")
	loop2 := textBlock(1, 1, &yid{1, 0}, nil, "q")
	tests := []struct {
		name    string
		updates [][]byte
		want    []byte
	}{
		{"none", nil, []byte{0, 0}},
		{"map values stay apart", [][]byte{testUpdate(nil, v1), testUpdate(nil, v2)}, testUpdate(nil, v1, v2)},
		{"deleted map values join", [][]byte{testUpdate(nil, d1), testUpdate(nil, d2)}, testUpdate(nil, d12)},
		{"an origin outside the updates keeps them apart", [][]byte{testUpdate(nil, b, c)}, testUpdate(nil, b, c)},
		{"origins in a circle", [][]byte{testUpdate(nil, loop1, loop2)}, testUpdate(nil, loop1, loop2)},
		{"a GC wins over an Item", [][]byte{testUpdate(nil, a, b), testUpdate(nil, gc(1, 1))}, testUpdate(nil, a, gc(1, 1))},
		{"a GC cuts an Item in three", [][]byte{testUpdate(nil, abc), testUpdate(nil, gc(1, 1))},
			testUpdate(nil, a, gc(1, 1), textBlock(1, 2, &yid{1, 1}, nil, "c"))},
		{"typing joins", [][]byte{testUpdate(nil, a), testUpdate(nil, b), testUpdate(nil, c)}, testUpdate(deleteSet{}, abc)},
		{"out of order", [][]byte{testUpdate(nil, c), testUpdate(nil, a), testUpdate(nil, b)}, testUpdate(deleteSet{}, abc)},
		{"duplicates", [][]byte{testUpdate(nil, a, b), testUpdate(nil, a, b), testUpdate(nil, a)},
			testUpdate(nil, textBlock(1, 0, nil, nil, "ab"))},
		{"overlap is cut", [][]byte{testUpdate(nil, textBlock(1, 0, nil, nil, "ab")), testUpdate(nil, textBlock(1, 1, &yid{1, 0}, nil, "bc"))},
			testUpdate(nil, abc)},
		{"a concurrent insertion at the same origin keeps them apart", [][]byte{testUpdate(nil, a, b), testUpdate(nil, x)},
			testUpdate(nil, x, a, b)},
		{"another right origin keeps them apart", [][]byte{testUpdate(nil, a, bRight)}, testUpdate(nil, a, bRight)},
		{"other content keeps them apart", [][]byte{testUpdate(nil, a, anyB)}, testUpdate(nil, a, anyB)},
		{"types never join", [][]byte{testUpdate(nil, textBlock(1, 0, nil, nil, "a")), testUpdate(nil, typeB)},
			testUpdate(nil, a, typeB)},
		{"GCs join", [][]byte{testUpdate(nil, gc(0, 2)), testUpdate(nil, gc(2, 3))}, testUpdate(nil, gc(0, 5))},
		{"deleted contents join", [][]byte{testUpdate(nil, del(0, 2, nil), del(2, 3, &yid{1, 1}))}, testUpdate(nil, del(0, 5, nil))},
		{"a gap becomes a Skip", [][]byte{testUpdate(nil, a), testUpdate(nil, c)}, testUpdate(nil, a, c)},
		{"delete sets are sorted and joined",
			[][]byte{testUpdate(deleteSet{1: {{10, 1}, {2, 3}}}), testUpdate(deleteSet{1: {{0, 2}, {4, 0}}, 3: {{5, 0}}})},
			testUpdate(deleteSet{1: {{0, 5}, {10, 1}}})},
		// Y.mergeUpdates of the first two text updates keeps "ab" and "c" apart.
		{"one update is rewritten", [][]byte{unhex(t, "01020100040101740261628401010163 00")},
			unhex(t, "01010100040101740361626300")},
		// The format in the fourth also follows "b": "c" stays apart.
		{"no join where another Item names the origin", goldenText(t), unhex(t, goldenTextMerged)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := mergeUpdates(tt.updates)
			if err != nil || !bytes.Equal(got, tt.want) {
				t.Errorf("got %x, %v; want %x", got, err, tt.want)
			}
		})
	}
}

func TestMergeUpdatesGolden(t *testing.T) {
	// "ab" then "c" join; Yjs keeps them apart.
	text := goldenText(t)
	got, err := mergeUpdates(text[:2])
	if want := "01010100040101740361626300"; err != nil || hex.EncodeToString(got) != want {
		t.Errorf("merge: got %x, %v; want %s", got, err, want)
	}
	// With all four, the bold 😀 that follows "b" too keeps them apart,
	// and the merge is Yjs's, as are its state vector and diffs.
	if got, err = mergeUpdates(text); err != nil || hex.EncodeToString(got) != goldenTextMerged {
		t.Errorf("merge: got %x, %v; want %s", got, err, goldenTextMerged)
	}
	sv, err := stateVectorFromUpdate(got)
	if err != nil || hex.EncodeToString(sv) != "010107" {
		t.Errorf("state vector %x, %v; want 010107", sv, err)
	}
	all := [][]byte{unhex(t, goldenMap), unhex(t, goldenEmbed), unhex(t, goldenFormat), unhex(t, goldenAny)}
	m, err := mergeUpdates(all)
	if err != nil {
		t.Fatal(err)
	}
	for i, u := range all {
		if ok, err := updateCovers(m, u); !ok || err != nil {
			t.Errorf("merge does not cover update %d: %v", i, err)
		}
	}
}

func TestMergeUpdatesErrors(t *testing.T) {
	tests := []struct {
		name    string
		updates [][]byte
		err     error
		context string
	}{
		{"truncated second", [][]byte{unhex(t, goldenText1), unhex(t, goldenText2)[:5]}, errShortFrame, "update 1"},
		{"empty first", [][]byte{{}}, errShortFrame, "update 0"},
		{"bad Any", [][]byte{unhex(t, "0101010008 010174 01 10 00")}, errBadUpdate, "update 0"},
		{"bad delete set", [][]byte{unhex(t, "00 01 01 01 00")}, errShortFrame, "delete set"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := mergeUpdates(tt.updates)
			if !errors.Is(err, tt.err) || !strings.Contains(fmt.Sprint(err), tt.context) {
				t.Errorf("got %v; want %v with %q", err, tt.err, tt.context)
			}
		})
	}
}

func TestUpdateCovers(t *testing.T) {
	text := goldenText(t)
	merged := unhex(t, goldenTextMerged)
	gapped := testUpdate(nil, textBlock(1, 0, nil, nil, "ab"), textBlock(1, 5, &yid{1, 4}, nil, "z"))
	tests := []struct {
		name        string
		have, other []byte
		want        bool
	}{
		{"merge covers its parts", merged, text[1], true},
		{"merge covers a delete", merged, text[2], true},
		{"a part lacks the rest", text[0], merged, false},
		{"structs without the delete", testUpdate(nil, textBlock(1, 0, nil, nil, "abc")), text[2], false},
		{"empty covers empty", []byte{0, 0}, []byte{0, 0}, true},
		{"beyond a gap", gapped, testUpdate(nil, textBlock(1, 5, &yid{1, 4}, nil, "z")), true},
		{"inside a gap", gapped, testUpdate(nil, textBlock(1, 2, &yid{1, 1}, nil, "q")), false},
		{"a GC counts as deleted", testUpdate(nil, block{client: 1, length: 3, ref: refGC}), testUpdate(deleteSet{1: {{1, 2}}}), true},
		{"deleted content counts as deleted",
			testUpdate(nil, block{client: 1, length: 3, ref: refDeleted, parent: rootParent("t")}), testUpdate(deleteSet{1: {{0, 3}}}), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := updateCovers(tt.have, tt.other)
			if got != tt.want || err != nil {
				t.Errorf("got %v, %v; want %v", got, err, tt.want)
			}
		})
	}
	if _, err := updateCovers(merged, []byte{1}); !errors.Is(err, errShortFrame) {
		t.Errorf("truncated other: got %v, want %v", err, errShortFrame)
	}
	if _, err := updateCovers(nil, merged); !errors.Is(err, errShortFrame) {
		t.Errorf("empty have: got %v, want %v", err, errShortFrame)
	}
}

func TestUpdateIsEmpty(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want bool
	}{
		{"empty update", "0000", true},
		{"only a Skip", "0101050a0a03 00", true},
		{"empty delete range", "00 01 01 01 0500", true},
		{"an Item", goldenText1, false},
		{"a delete", goldenText3, false},
		{"truncated", "00", false},
		{"nothing", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := updateIsEmpty(unhex(t, tt.in)); got != tt.want {
				t.Errorf("got %v, want %v", got, tt.want)
			}
		})
	}
}

func TestStateVectorCodec(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want map[uint64]uint64
		err  error
	}{
		{"empty", "00", map[uint64]uint64{}, nil},
		{"two", "02 0105 c8010a", map[uint64]uint64{1: 5, 200: 10}, nil},
		{"last of a client wins", "02 0105 0107", map[uint64]uint64{1: 7}, nil},
		{"trailing bytes", "01 0105 ff", map[uint64]uint64{1: 5}, nil},
		{"count beyond the bytes", "ffffff7f 0105", nil, errShortFrame},
		{"truncated pair", "01 01", nil, errShortFrame},
		{"nothing", "", nil, errShortFrame},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeStateVector(unhex(t, tt.in))
			if !errors.Is(err, tt.err) || !maps.Equal(got, tt.want) {
				t.Errorf("got %v, %v; want %v, %v", got, err, tt.want, tt.err)
			}
		})
	}
	if got := hex.EncodeToString(encodeStateVector(map[uint64]uint64{1: 5, 200: 10})); got != "02c8010a0105" {
		t.Errorf("encode: got %s, want 02c8010a0105 (highest client first)", got)
	}
	have := map[uint64]uint64{1: 5, 2: 3}
	for _, tt := range []struct {
		want map[uint64]uint64
		ok   bool
	}{
		{map[uint64]uint64{}, true},
		{map[uint64]uint64{1: 5}, true},
		{map[uint64]uint64{1: 6}, false},
		{map[uint64]uint64{3: 1}, false},
		{map[uint64]uint64{3: 0}, true},
	} {
		if got := svCovers(have, tt.want); got != tt.ok {
			t.Errorf("svCovers(%v, %v) = %v, want %v", have, tt.want, got, tt.ok)
		}
	}
}

func TestJSString(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want string
	}{
		{"valid", "a\u00e9\U0001F600", "a\u00e9\U0001F600"},
		{"truncated three-byte sequence is one U+FFFD", "\xe2\x82A", "\uFFFDA"},
		{"encoded surrogate is three", "\xed\xa0\x80", "\uFFFD\uFFFD\uFFFD"},
		{"truncated four-byte sequence at the end", "x\xf0\x90\x80", "x\uFFFD"},
		{"stray continuation", "\x80\x80", "\uFFFD\uFFFD"},
		{"overlong", "\xc0\xaf", "\uFFFD\uFFFD"},
		{"E0 then a low continuation", "\xe0\x80", "\uFFFD\uFFFD"},
		{"above U+10FFFF", "\xf4\x90\x80\x80", "\uFFFD\uFFFD\uFFFD\uFFFD"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := string(jsString([]byte(tt.in))); got != tt.want {
				t.Errorf("got %+q, want %+q", got, tt.want)
			}
		})
	}
}

func TestUTF16Tail(t *testing.T) {
	s := []byte("a\U0001F600b\u00e9")
	tests := []struct {
		k    uint64
		want string
	}{
		{0, "a\U0001F600b\u00e9"},
		{1, "\U0001F600b\u00e9"},
		{2, "\uFFFDb\u00e9"},
		{3, "b\u00e9"},
		{4, "\u00e9"},
		{5, ""},
	}
	for _, tt := range []struct {
		k          uint64
		head, tail string
	}{
		{1, "a", "\U0001F600b\u00e9"},
		{2, "a\uFFFD", "\uFFFDb\u00e9"},
		{5, "a\U0001F600b\u00e9", ""},
	} {
		if head, tail := utf16Split(s, tt.k); string(head) != tt.head || string(tail) != tt.tail {
			t.Errorf("utf16Split(%d): got %+q, %+q; want %+q, %+q", tt.k, head, tail, tt.head, tt.tail)
		}
	}
	if n := utf16Len(s); n != 5 {
		t.Fatalf("utf16Len: got %d, want 5", n)
	}
	for _, tt := range tests {
		if got := string(utf16Tail(s, tt.k)); got != tt.want {
			t.Errorf("utf16Tail(%d): got %+q, want %+q", tt.k, got, tt.want)
		}
	}
}

func TestSkipAny(t *testing.T) {
	deep := bytes.Repeat([]byte{anyArray, 1}, 200000)
	deep = append(deep, anyNull)
	tests := []struct {
		name string
		in   []byte
		n    int // bytes taken
		err  error
	}{
		{"null", []byte{anyNull, 9}, 1, nil},
		{"int one byte", []byte{anyInt, 0x05}, 2, nil},
		{"int continued", []byte{anyInt, 0x81, 0x01}, 3, nil},
		{"float32", []byte{anyFloat32, 1, 2, 3, 4}, 5, nil},
		{"bigint", []byte{anyBigInt, 1, 2, 3, 4, 5, 6, 7, 8}, 9, nil},
		{"object", []byte{anyObject, 2, 1, 'a', anyTrue, 1, 'b', anyArray, 2, anyFalse, anyString, 1, 'x'}, 13, nil},
		{"empty object then more", []byte{anyObject, 0, 7}, 2, nil},
		{"bytes", []byte{anyBytes, 2, 0, 0}, 4, nil},
		{"deep nesting", deep, len(deep), nil},
		{"unknown type", []byte{0x10}, 0, errBadUpdate},
		{"truncated float64", []byte{anyFloat64, 1, 2}, 0, errShortFrame},
		{"truncated object", []byte{anyObject, 1, 1, 'a'}, 0, errShortFrame},
		{"count beyond the bytes", []byte{anyArray, 0xff, 0xff, 0x03, anyNull}, 0, errShortFrame},
		{"varint past 2^53", append([]byte{anyInt}, bytes.Repeat([]byte{0xff}, 9)...), 0, errBadUpdate},
		{"empty", nil, 0, errShortFrame},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := cursor{tt.in}
			err := c.skipAny()
			n := len(tt.in) - len(c.b)
			if !errors.Is(err, tt.err) || (err == nil && n != tt.n) {
				t.Errorf("got %d bytes, %v; want %d, %v", n, err, tt.n, tt.err)
			}
		})
	}
}

// updateSeeds are real and handcrafted updates for the fuzz targets.
func updateSeeds(t testing.TB) [][]byte {
	seeds := goldenText(t)
	for _, h := range []string{goldenTextMerged, goldenTextDiff1, goldenTextDiff5, goldenMap, goldenEmbed, goldenFormat, goldenAny,
		"0000", "01020500 0a03 0401017402616200", "0101010005 010174 027b7d 00"} {
		seeds = append(seeds, unhex(t, h))
	}
	// Handcrafted: text to join, a GC over part of it, map values.
	key := append(rootParent("m"), 1, 'k')
	return append(seeds,
		testUpdate(deleteSet{1: {{1, 1}}}, textBlock(1, 0, nil, nil, "a\U0001F600"), textBlock(1, 3, &yid{1, 2}, nil, "bc")),
		testUpdate(nil, block{client: 1, clock: 1, length: 2, ref: refGC}),
		testUpdate(nil, block{client: 2, length: 1, ref: refAny, content: []byte{anyTrue}, parent: key, parentSub: true},
			block{client: 2, clock: 1, length: 1, ref: refAny, content: []byte{anyNull}, origin: yid{2, 0}, hasOrigin: true}))
}

// structRanges is the clocks that update's structs cover, per client.
func structRanges(t testing.TB, update []byte) deleteSet {
	t.Helper()
	blocks, _ := blocksOf(t, update)
	ranges := deleteSet{}
	for _, b := range blocks {
		ranges[b.client] = append(ranges[b.client], dsRange{b.clock, b.length})
	}
	ranges.compact()
	return ranges
}

// decodedSV decodes an encoded state vector, failing the test on an error.
func decodedSV(t testing.TB, sv []byte) map[uint64]uint64 {
	t.Helper()
	m, err := decodeStateVector(sv)
	if err != nil {
		t.Fatalf("state vector %x: %v", sv, err)
	}
	return m
}

func FuzzStateVectorFromUpdate(f *testing.F) {
	for _, s := range updateSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, update []byte) {
		sv, err := stateVectorFromUpdate(update)
		if err != nil {
			return
		}
		if again := encodeStateVector(decodedSV(t, sv)); !bytes.Equal(again, sv) {
			t.Errorf("state vector %x re-encodes as %x", sv, again)
		}
	})
}

func FuzzMergeUpdates(f *testing.F) {
	seeds := updateSeeds(f)
	for i, s := range seeds {
		f.Add(s, seeds[(i+1)%len(seeds)])
	}
	f.Fuzz(func(t *testing.T, a, b []byte) {
		m, err := mergeUpdates([][]byte{a, b})
		if err != nil {
			return
		}
		if again, err := mergeUpdates([][]byte{m}); err != nil || !bytes.Equal(again, m) {
			t.Fatalf("merge %x merges again as %x, %v", m, again, err)
		}
		if d, err := diffUpdate(m, []byte{0}); err != nil || !bytes.Equal(d, m) {
			t.Errorf("diff of merge %x against nothing: %x, %v", m, d, err)
		}
		for _, u := range [][]byte{a, b} {
			if ok, err := updateCovers(m, u); !ok || err != nil {
				t.Errorf("merge %x does not cover %x: %v", m, u, err)
			}
		}
		// The state vector is where each client's clocks in a or b stop
		// running from 0.
		want := map[uint64]uint64{}
		ranges := structRanges(t, a)
		ranges.add(structRanges(t, b))
		ranges.compact()
		for client, rs := range ranges {
			if rs[0].clock == 0 {
				want[client] = rs[0].length
			}
		}
		sv, err := stateVectorFromUpdate(m)
		if err != nil || !maps.Equal(decodedSV(t, sv), want) {
			t.Errorf("state vector of merge %x: %x, %v; want %v", m, sv, err, want)
		}
	})
}

func FuzzDiffUpdate(f *testing.F) {
	for _, s := range updateSeeds(f) {
		f.Add(s, []byte{0})
		f.Add(s, unhex(f, "010105"))
		f.Add(s, unhex(f, "0201010209"))
	}
	f.Fuzz(func(t *testing.T, update, sv []byte) {
		if _, err := diffUpdate(update, sv); err != nil {
			return
		}
		m, err := mergeUpdates([][]byte{update})
		if err != nil {
			t.Fatalf("diff takes %x, merge fails: %v", update, err)
		}
		d, err := diffUpdate(m, sv)
		if err != nil {
			t.Fatalf("diff of merge %x: %v", m, err)
		}
		// The diff holds the merge's clocks from the state vector on.
		want := structRanges(t, m)
		for client, clock := range decodedSV(t, sv) {
			var cut []dsRange
			for _, r := range want[client] {
				if r.clock+r.length > clock {
					start := max(r.clock, clock)
					cut = append(cut, dsRange{start, r.clock + r.length - start})
				}
			}
			want[client] = cut
		}
		want.compact()
		if got := structRanges(t, d); !maps.EqualFunc(got, want, slices.Equal) {
			t.Errorf("diff of %x against %x covers %v, want %v", m, sv, got, want)
		}
		for _, parts := range [][][]byte{{m, d}, {d, m}} {
			if again, err := mergeUpdates(parts); err != nil || !bytes.Equal(again, m) {
				t.Errorf("merge with its diff: %x, %v; want %x", again, err, m)
			}
		}
	})
}

// Differential test against Yjs: interop/updates-oracle.mjs.

const (
	// oracleTimeout is the hard limit of one oracle run; the run takes
	// well under a minute.
	oracleTimeout = 150 * time.Second
	// oracleDocs and oracleInserts are the default run's random documents
	// and the single-character inserts of its size case.
	oracleDocs    = 2000
	oracleInserts = 20000
	// maxMergeRatio bounds the merge of the size case against
	// Y.encodeStateAsUpdate of its document.
	maxMergeRatio = 8
)

// oracleLine is one line of updates-oracle.mjs: a request ("doc",
// "size") or its summary ("done"). []byte fields come as base64.
type oracleLine struct {
	Kind      string     `json:"kind"`
	I         int        `json:"i"`
	Updates   [][]byte   `json:"updates"`
	Subset    []int      `json:"subset"`
	SVs       [][]byte   `json:"svs"`
	YjsMerged []byte     `json:"yjsMerged"`
	State     []byte     `json:"state"`
	YjsSubset []byte     `json:"yjsSubset"`
	FinalSV   []byte     `json:"finalSV"`
	YjsSV     [][]byte   `json:"yjsSV"`
	YjsDiffs  [][][]byte `json:"yjsDiffs"`
	// The size case, and the store mode's document.
	StateBytes     int    `json:"stateBytes"`
	YjsMergedBytes int    `json:"yjsMergedBytes"`
	Text           string `json:"text"`
	// The summary.
	Failed   int            `json:"failed"`
	Failures []string       `json:"failures"`
	Stats    map[string]int `json:"stats"`
}

// oracleAnswer is Go's answer to a request; the script applies its
// updates to fresh Y.Docs.
type oracleAnswer struct {
	Error   string   `json:"error,omitempty"`
	Merged  []byte   `json:"merged"`
	Merged2 []byte   `json:"merged2,omitempty"` // merge of the merges of two halves
	Merged3 []byte   `json:"merged3,omitempty"` // merge of Subset and the other updates
	Subset  []byte   `json:"subset,omitempty"`  // merge of the subset
	Diffs   [][]byte `json:"diffs,omitempty"`   // diff of Merged against each state vector
}

// requireOracle skips or, in CI, fails the test when Node or the yjs
// package is missing.
func requireOracle(t *testing.T) {
	t.Helper()
	_, nodeErr := exec.LookPath("node")
	_, modErr := os.Stat(filepath.Join("interop", "node_modules", "yjs", "package.json"))
	if nodeErr == nil && modErr == nil {
		return
	}
	msg := "Yjs oracle unavailable: install Node, then run `npm ci` in interop/"
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// oracleCounts is the documents and inserts of the run: the defaults,
// a tenth with -short outside CI, or ELVA_ORACLE_DOCS.
func oracleCounts(t *testing.T) (docs, inserts int) {
	docs, inserts = oracleDocs, oracleInserts
	if testing.Short() && os.Getenv("CI") == "" {
		docs, inserts = oracleDocs/10, oracleInserts/10
	}
	if v := os.Getenv("ELVA_ORACLE_DOCS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			t.Fatalf("ELVA_ORACLE_DOCS=%q: want a count", v)
		}
		docs = n
	}
	return docs, inserts
}

// TestUpdatesMatchYjs checks stateVectorFromUpdate, diffUpdate and
// mergeUpdates against Yjs on thousands of random documents (see
// interop/updates-oracle.mjs), and the size of a merge of 20,000
// single-character inserts.
func TestUpdatesMatchYjs(t *testing.T) {
	requireOracle(t)
	docs, inserts := oracleCounts(t)
	seed := cmp.Or(os.Getenv("ELVA_ORACLE_SEED"), "1")
	start := time.Now()
	o := startOracle(t, oracleTimeout, seed, strconv.Itoa(docs), strconv.Itoa(inserts))
	var goFailures int
	for {
		var line oracleLine
		o.next(t, &line)
		var ans oracleAnswer
		switch line.Kind {
		case "doc":
			ans = checkOracleDoc(t, &line, &goFailures)
		case "size":
			ans = checkOracleSize(t, &line)
		case "done":
			o.finished = true
			reportOracle(t, &line, time.Since(start))
			return
		default:
			t.Fatalf("updates-oracle line of kind %q", line.Kind)
		}
		o.answer(t, ans)
	}
}

// oracle is a running interop/updates-oracle.mjs: the test reads its
// lines with next and writes its answers with answer, from the test's
// goroutine only.
type oracle struct {
	args     []string
	lines    chan []byte // from readLines; closed when the script exits
	readErr  *error
	out      *json.Encoder
	stderr   *logBuffer
	finished bool // its summary came: from now on its exit status counts
}

// startOracle runs `node updates-oracle.mjs args...` in interop/ for at
// most timeout. The process never outlives the test: at the end it is
// killed unless it has finished, and reaped.
func startOracle(t *testing.T, timeout time.Duration, args ...string) *oracle {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	cmd := exec.CommandContext(ctx, "node", append([]string{"updates-oracle.mjs"}, args...)...)
	cmd.Dir = "interop"
	o := &oracle{args: args, stderr: newLogBuffer()}
	cmd.Stderr = o.stderr
	cmd.WaitDelay = 5 * time.Second
	stdin, err := cmd.StdinPipe()
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		if !o.finished {
			cmd.Process.Kill()
		}
		if err := cmd.Wait(); err != nil && o.finished {
			t.Errorf("updates-oracle: %v\n%s", err, o.stderr.String())
		}
		cancel()
	})
	o.lines, o.readErr = readLines(stdout)
	o.out = json.NewEncoder(stdin)
	return o
}

// next decodes the script's next line into v.
func (o *oracle) next(t *testing.T, v any) {
	t.Helper()
	raw, ok := <-o.lines
	if !ok {
		t.Fatalf("updates-oracle %q ended early: %v\n%s", o.args, *o.readErr, o.stderr.String())
	}
	if err := json.Unmarshal(raw, v); err != nil {
		t.Fatalf("updates-oracle line %.200q: %v", raw, err)
	}
}

// answer writes v to the script as one line of JSON.
func (o *oracle) answer(t *testing.T, v any) {
	t.Helper()
	if err := o.out.Encode(v); err != nil {
		t.Fatalf("updates-oracle input: %v\n%s", err, o.stderr.String())
	}
}

// oracleAhead is how many lines updates-oracle.mjs sends before it
// reads an answer, at most; readLines buffers one more for its summary.
const oracleAhead = 2

// readLines reads r's lines in a goroutine of its own, so that the script
// never blocks on a full pipe while the test writes to it. The goroutine
// closes lines and returns at the end of r (the process's exit), leaving
// the read error in *err.
func readLines(r io.Reader) (lines chan []byte, err *error) {
	lines = make(chan []byte, oracleAhead+1)
	err = new(error)
	go func() {
		defer close(lines)
		in := bufio.NewReader(r)
		for {
			raw, e := in.ReadBytes('\n')
			if e != nil {
				*err = e
				return
			}
			lines <- raw
		}
	}()
	return lines, err
}

// checkOracleDoc checks Go's state vectors and diffs of one document
// against Yjs's and returns Go's merges and diffs for the script.
func checkOracleDoc(t *testing.T, d *oracleLine, failures *int) oracleAnswer {
	t.Helper()
	fail := func(format string, args ...any) {
		if *failures++; *failures <= 20 {
			t.Errorf("doc %d: "+format, append([]any{d.I}, args...)...)
		}
	}
	// State vectors, as decoded maps: Yjs writes a client twice where an
	// update lists it twice.
	svOf := append(slices.Clone(d.Updates), d.YjsMerged, d.State, d.YjsSubset)
	for k, u := range svOf {
		sv, err := stateVectorFromUpdate(u)
		if err != nil || !svEqual(sv, d.YjsSV[k]) {
			fail("state vector of update %d: %x, %v; Yjs %x", k, sv, err, d.YjsSV[k])
		}
	}
	// Diffs of Yjs's updates: byte for byte.
	for k, u := range [][]byte{d.YjsMerged, d.State} {
		for j, sv := range d.SVs {
			got, err := diffUpdate(u, sv)
			if err != nil || !bytes.Equal(got, d.YjsDiffs[k][j]) {
				fail("diff %d against sv %d: %x, %v; Yjs %x", k, j, got, err, d.YjsDiffs[k][j])
			}
		}
	}
	merged, err := mergeUpdates(d.Updates)
	if err != nil {
		fail("merge: %v", err)
		return oracleAnswer{Error: err.Error()}
	}
	half := len(d.Updates) / 2
	m1, err1 := mergeUpdates(d.Updates[:half])
	m2, err2 := mergeUpdates(d.Updates[half:])
	merged2, err3 := mergeUpdates([][]byte{m1, m2})
	var subset, rest [][]byte
	for k, u := range d.Updates {
		if slices.Contains(d.Subset, k) {
			subset = append(subset, u)
		} else {
			rest = append(rest, u)
		}
	}
	sub, err4 := mergeUpdates(subset)
	merged3, err5 := mergeUpdates(append([][]byte{sub}, rest...))
	if err := cmp.Or(err1, err2, err3, err4, err5); err != nil {
		fail("merge: %v", err)
		return oracleAnswer{Error: err.Error()}
	}
	checkOracleMerge(d, merged, sub, fail)
	ans := oracleAnswer{Merged: merged, Merged2: merged2, Merged3: merged3, Subset: sub}
	for _, sv := range d.SVs {
		diff, err := diffUpdate(merged, sv)
		if err != nil {
			fail("diff of merge: %v", err)
			return oracleAnswer{Error: err.Error()}
		}
		ans.Diffs = append(ans.Diffs, diff)
	}
	return ans
}

// checkOracleMerge checks Go's merge of all updates and of the subset
// against what Yjs says of them, without a document.
func checkOracleMerge(d *oracleLine, merged, sub []byte, fail func(string, ...any)) {
	if sv, err := stateVectorFromUpdate(merged); err != nil || !svEqual(sv, d.FinalSV) {
		fail("state vector of merge: %x, %v; document's %x", sv, err, d.FinalSV)
	}
	if sv, err := stateVectorFromUpdate(sub); err != nil || !svEqual(sv, d.YjsSV[len(d.YjsSV)-1]) {
		fail("state vector of subset merge: %x, %v; Yjs %x", sv, err, d.YjsSV[len(d.YjsSV)-1])
	}
	if again, err := mergeUpdates([][]byte{merged}); err != nil || !bytes.Equal(again, merged) {
		fail("merge of the merge differs: %v", err)
	}
	if diff, err := diffUpdate(merged, d.FinalSV); err != nil || !updateIsEmptyStructs(diff) {
		fail("diff of merge against the final state vector has structs: %x, %v", diff, err)
	}
	// Not d.State: its delete set lists what Yjs derives when it
	// integrates (an Item in a deleted type, the loser of a concurrent
	// map write), which no update's delete set need list. Yjs's merge
	// holds every update; a few of them on their own suffice beside it.
	others := [][]byte{d.YjsMerged}
	for k := 0; k < len(d.Updates); k += max(1, len(d.Updates)/4) {
		others = append(others, d.Updates[k])
	}
	for k, u := range others {
		if ok, err := updateCovers(merged, u); !ok || err != nil {
			fail("merge does not cover update %d: %v", k, err)
		}
	}
	if ok, err := updateCovers(d.YjsMerged, merged); !ok || err != nil {
		fail("Yjs's merge does not cover Go's: %v", err)
	}
}

// updateIsEmptyStructs reports whether update has no struct but Skips.
func updateIsEmptyStructs(update []byte) bool {
	blocks, _, err := decodeUpdate(update, nil)
	return err == nil && len(blocks) == 0
}

// svEqual compares two encoded state vectors as maps.
func svEqual(a, b []byte) bool {
	ma, errA := decodeStateVector(a)
	mb, errB := decodeStateVector(b)
	return errA == nil && errB == nil && maps.Equal(ma, mb)
}

// checkOracleSize merges the single-character inserts and checks the
// merge's size against Y.encodeStateAsUpdate of the document.
func checkOracleSize(t *testing.T, d *oracleLine) oracleAnswer {
	t.Helper()
	start := time.Now()
	merged, err := mergeUpdates(d.Updates)
	if err != nil {
		t.Errorf("size case: merge: %v", err)
		return oracleAnswer{Error: err.Error()}
	}
	total := 0
	for _, u := range d.Updates {
		total += len(u)
	}
	t.Logf("size case: %d single-character updates (%d bytes) merge in %v to %d bytes; Yjs's mergeUpdates %d bytes, Y.encodeStateAsUpdate %d bytes (Go %.2fx, Yjs merge %.2fx)",
		len(d.Updates), total, time.Since(start).Round(time.Millisecond), len(merged), d.YjsMergedBytes, d.StateBytes,
		float64(len(merged))/float64(d.StateBytes), float64(d.YjsMergedBytes)/float64(d.StateBytes))
	if len(merged) > maxMergeRatio*d.StateBytes {
		t.Errorf("size case: merge is %d bytes, over %dx the document's %d", len(merged), maxMergeRatio, d.StateBytes)
	}
	return oracleAnswer{Merged: merged}
}

// reportOracle fails the test on the script's failures and logs its counts.
func reportOracle(t *testing.T, done *oracleLine, took time.Duration) {
	t.Helper()
	for _, f := range done.Failures {
		t.Error(f)
	}
	if done.Failed > 0 {
		t.Errorf("updates-oracle: %d checks failed (%d shown)", done.Failed, len(done.Failures))
	}
	s := done.Stats
	t.Logf("updates-oracle: %d documents, %d updates, %d checks in %v; merged bytes: Go %d, Yjs %d, Y.encodeStateAsUpdate %d; "+
		"%d documents split a surrogate pair, where %d checks matched only up to U+FFFD; "+
		"%d subsets left other structs pending than Yjs's merge, with the same content",
		s["docs"], s["updates"], s["checks"], took.Round(time.Millisecond), s["goMergedBytes"], s["yjsMergedBytes"], s["stateBytes"],
		s["surrogateSplitDocs"], s["looseMatches"], s["pendingDiffers"])
}

// TestAppendServerFrame checks the frame header of RFC 6455 §5.2 at each
// length boundary: FIN and opcode, then a 7-bit, 16-bit or 64-bit length,
// no mask, then the payload as it is.
func TestAppendServerFrame(t *testing.T) {
	tests := []struct {
		size   int
		header string
	}{
		{0, "82 00"},
		{125, "82 7d"},
		{126, "82 7e 00 7e"},
		{65535, "82 7e ff ff"},
		{65536, "82 7f 00 00 00 00 00 01 00 00"},
	}
	for _, tt := range tests {
		payload := bytes.Repeat([]byte{0xa5}, tt.size)
		got := appendServerFrame([]byte{0xee}, 2, payload)
		header := unhex(t, tt.header)
		if got[0] != 0xee || !bytes.Equal(got[1:1+len(header)], header) || !bytes.Equal(got[1+len(header):], payload) {
			t.Errorf("size %d: header % x, want % x after what was there", tt.size, got[1:min(len(got), 1+len(header))], header)
		}
	}
}

func TestParseFrameHeader(t *testing.T) {
	tests := []struct {
		name   string
		header string
		want   frameHeader
		err    error
	}{
		{"masked small binary", "82 85 01 02 03 04", frameHeader{fin: true, opcode: opBinary, masked: true, size: 5, mask: [4]byte{1, 2, 3, 4}}, nil},
		{"unmasked ping, no payload", "89 00", frameHeader{fin: true, opcode: opPing}, nil},
		{"continuation without FIN", "00 03", frameHeader{opcode: opContinuation, size: 3}, nil},
		{"16-bit length", "82 fe 01 00 0a 0b 0c 0d", frameHeader{fin: true, opcode: opBinary, masked: true, size: 256, mask: [4]byte{0xa, 0xb, 0xc, 0xd}}, nil},
		{"64-bit length", "82 7f 00 00 00 00 00 01 00 00", frameHeader{fin: true, opcode: opBinary, size: 65536}, nil},
		{"64-bit length past an int", "82 7f 80 00 00 00 00 00 00 00", frameHeader{fin: true, opcode: opBinary, size: -1}, nil},
		{"RSV bits kept for the check", "c2 00", frameHeader{fin: true, opcode: opBinary}, nil},
		{"one byte", "82", frameHeader{}, errProtocol},
		{"mask missing", "82 85 01 02", frameHeader{}, errProtocol},
		{"16-bit length cut", "82 7e 01", frameHeader{}, errProtocol},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hdr := unhex(t, tt.header)
			got, err := parseFrameHeader(hdr)
			if got != tt.want || !errors.Is(err, tt.err) {
				t.Errorf("got %+v, %v; want %+v, %v", got, err, tt.want, tt.err)
			}
			if tt.err == nil && frameHeaderLen(hdr[1]) != len(hdr) {
				t.Errorf("frameHeaderLen %d, want %d", frameHeaderLen(hdr[1]), len(hdr))
			}
		})
	}
}

// TestMaskBytes checks the word-wise masking against RFC 6455 §5.3's
// byte-wise rule, from every start position in the key and for lengths
// around the word size, and that masking twice gives the bytes back.
func TestMaskBytes(t *testing.T) {
	key := [4]byte{0x37, 0xfa, 0x21, 0x3d}
	for _, size := range []int{0, 1, 7, 8, 9, 15, 16, 17, 100} {
		for pos := range 4 {
			plain := make([]byte, size)
			for i := range plain {
				plain[i] = byte(i * 7)
			}
			got := slices.Clone(plain)
			maskBytes(key, pos, got)
			for i := range got {
				if want := plain[i] ^ key[(pos+i)%4]; got[i] != want {
					t.Fatalf("size %d from %d: byte %d is %#x, want %#x", size, pos, i, got[i], want)
				}
			}
			maskBytes(key, pos, got)
			if !bytes.Equal(got, plain) {
				t.Fatalf("size %d from %d: masking twice gave % x, want % x", size, pos, got, plain)
			}
		}
	}
}

// FuzzParseFrameHeader checks that any bytes give a header or an error,
// never a panic, and that an unmasked final frame's header, encoded again
// by appendServerHeader, reads back the same.
func FuzzParseFrameHeader(f *testing.F) {
	for _, seed := range []string{"82 85 01 02 03 04", "89 00", "82 7e 01 00", "82 7f 00 00 00 00 00 01 00 00", "82", ""} {
		b, _ := hex.DecodeString(strings.ReplaceAll(seed, " ", ""))
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, hdr []byte) {
		h, err := parseFrameHeader(hdr)
		if err != nil || !h.fin || h.masked || h.size < 0 {
			return
		}
		again, err := parseFrameHeader(appendServerHeader(nil, h.opcode, h.size))
		if err != nil || again != h {
			t.Errorf("% x read as %+v, re-encoded as %+v, %v", hdr, h, again, err)
		}
	})
}
