package main

import (
	"bytes"
	"encoding/hex"
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
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
