package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"
)

// Yjs updates for the store tests, made with yjs 13.6.33 (interop/):
//
//	cd interop && node --input-type=module -e "
//	import * as Y from 'yjs'
//	const a = new Y.Doc(); a.clientID = 1
//	const b = new Y.Doc(); b.clientID = 2
//	const ups = []
//	a.on('update', u => ups.push(u)); b.on('update', u => ups.push(u))
//	a.getText('t').insert(0, 'hello')  // yHello
//	a.getText('t').insert(5, ' world') // yWorld
//	a.getText('t').delete(0, 6)        // yDelete: the text is 'world'
//	b.getMap('m').set('k', 'v')        // yMap
//	ups.forEach(u => console.log(Buffer.from(u).toString('hex')))"
//
// All four applied give the state vector {1: 11, 2: 1}.
const (
	yHello  = "01 01 01 00 04 01 01 74 05 68 65 6c 6c 6f 00"
	yWorld  = "01 01 01 05 84 01 04 06 20 77 6f 72 6c 64 00"
	yDelete = "00 01 01 01 00 06"
	yMap    = "01 01 02 00 28 01 01 6d 01 6b 01 77 01 76 00"
)

// yjsText130 is what Yjs writes for client 7 inserting "abcdefghij" 13
// times into the empty text "t" (Y.encodeStateAsUpdate, as above): a
// string whose length takes two bytes.
const yjsText130 = "01 01 07 00 04 01 01 74 82 01 61 62 63 64 65 66 67 68 69 6a 61 62 63 64 65 66" +
	" 67 68 69 6a 61 62 63 64 65 66 67 68 69 6a 61 62 63 64 65 66 67 68 69 6a 61 62" +
	" 63 64 65 66 67 68 69 6a 61 62 63 64 65 66 67 68 69 6a 61 62 63 64 65 66 67 68" +
	" 69 6a 61 62 63 64 65 66 67 68 69 6a 61 62 63 64 65 66 67 68 69 6a 61 62 63 64" +
	" 65 66 67 68 69 6a 61 62 63 64 65 66 67 68 69 6a 61 62 63 64 65 66 67 68 69 6a" +
	" 61 62 63 64 65 66 67 68 69 6a 00"

// yjsText is the update Yjs writes when client, in a new document,
// inserts the ASCII string s into the root text key: one Item with a
// string content whose parent is named by key. For updates of any size
// (TestStoreTextFixtureIsYjs checks it against Yjs).
func yjsText(client uint64, key, s string) []byte {
	u := appendVaruint([]byte{1, 1}, client) // one client, one struct
	u = append(u, 0, 4, 1)                   // clock 0; ContentString; parent by key
	u = appendVaruint(u, uint64(len(key)))
	u = append(u, key...)
	u = appendVaruint(u, uint64(len(s)))
	u = append(u, s...)
	return append(u, 0) // no deletions
}

func TestStoreTextFixtureIsYjs(t *testing.T) {
	tests := []struct {
		name string
		got  []byte
		want string
	}{
		{"hello", yjsText(1, "t", "hello"), yHello},
		{"130 characters", yjsText(7, "t", strings.Repeat("abcdefghij", 13)), yjsText130},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if want := unhex(t, tt.want); !bytes.Equal(tt.got, want) {
				t.Errorf("got % x, want % x", tt.got, want)
			}
		})
	}
}

// ---- Record format ----

func TestRecordRoundTrip(t *testing.T) {
	tests := []struct {
		name    string
		typ     byte
		payload []byte
	}{
		{"empty name", recName, nil},
		{"name", recName, []byte("notes/Grüße")},
		{"update", recUpdate, []byte{1, 1, 1, 0, 4}},
		{"large update", recUpdate, bytes.Repeat([]byte{0xa5}, 70000)},
		{"unknown type", 9, []byte("later versions")},
	}
	var all []byte
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := appendRecord(nil, tt.typ, tt.payload)
			if want := recordHeader + 1 + len(tt.payload); len(rec) != want {
				t.Fatalf("record is %d bytes, want %d", len(rec), want)
			}
			typ, payload, n, err := readRecord(rec)
			if err != nil || typ != tt.typ || !bytes.Equal(payload, tt.payload) || n != len(rec) {
				t.Errorf("got %d, %d bytes, n %d, %v; want %d, %d bytes, n %d, nil", typ, len(payload), n, err, tt.typ, len(tt.payload), len(rec))
			}
		})
		all = appendRecord(all, tt.typ, tt.payload)
	}
	var got []string
	good, err := readRecords(all, func(typ byte, payload []byte) error {
		got = append(got, fmt.Sprintf("%d:%d", typ, len(payload)))
		return nil
	})
	var want []string
	for _, tt := range tests {
		want = append(want, fmt.Sprintf("%d:%d", tt.typ, len(tt.payload)))
	}
	if good != len(all) || err != nil || !slices.Equal(got, want) {
		t.Errorf("readRecords: got %v, good %d, %v; want %v, good %d, nil", got, good, err, want, len(all))
	}
}

// recordsOf reads data with readRecords and returns the payloads, the
// good length and the error.
func recordsOf(data []byte) (payloads []string, good int, err error) {
	good, err = readRecords(data, func(typ byte, payload []byte) error {
		payloads = append(payloads, string(payload))
		return nil
	})
	return payloads, good, err
}

// twoRecords is a good prefix of two records and a third record that
// the tests tear or corrupt.
func twoRecords() (prefix, last []byte) {
	prefix = appendRecord(appendRecord(nil, recName, []byte("doc")), recUpdate, []byte("first"))
	return prefix, appendRecord(nil, recUpdate, []byte("the last record"))
}

func TestReadRecordsTornTail(t *testing.T) {
	prefix, last := twoRecords()
	for cut := 1; cut < len(last); cut++ {
		data := append(slices.Clip(prefix), last[:cut]...)
		got, good, err := recordsOf(data)
		if good != len(prefix) || !errors.Is(err, errBadRecord) || !slices.Equal(got, []string{"doc", "first"}) {
			t.Errorf("cut after %d bytes: got %q, good %d, %v; want the two records, good %d, errBadRecord", cut, got, good, err, len(prefix))
		}
	}
	got, good, err := recordsOf(append(slices.Clip(prefix), last...))
	if good != len(prefix)+len(last) || err != nil || len(got) != 3 {
		t.Errorf("whole: got %q, good %d, %v; want 3 records, good %d, nil", got, good, err, len(prefix)+len(last))
	}
}

func TestReadRecordsFlippedBit(t *testing.T) {
	prefix, last := twoRecords()
	// Every bit of the last record: its length, its checksum and its body.
	for bit := 0; bit < 8*len(last); bit++ {
		bad := slices.Clone(last)
		bad[bit/8] ^= 1 << (bit % 8)
		data := append(slices.Clip(prefix), bad...)
		got, good, err := recordsOf(data)
		if good != len(prefix) || !errors.Is(err, errBadRecord) || !slices.Equal(got, []string{"doc", "first"}) {
			t.Errorf("bit %d (byte %d) flipped: got %q, good %d, %v; want the two records, good %d, errBadRecord", bit, bit/8, got, good, err, len(prefix))
		}
	}
}

func TestReadRecordGiantLength(t *testing.T) {
	prefix, _ := twoRecords()
	tests := []struct {
		name   string
		length uint32
	}{
		{"zero", 0},
		{"one past the data", 40},
		{"the largest record", maxRecord},
		{"past the largest record", maxRecord + 1},
		{"all ones", 0xffffffff},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := binary.LittleEndian.AppendUint32(nil, tt.length)
			rec = append(rec, bytes.Repeat([]byte{0x5a}, 35)...)
			data := append(slices.Clip(prefix), rec...)
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			got, good, err := recordsOf(data)
			runtime.ReadMemStats(&after)
			if good != len(prefix) || !errors.Is(err, errBadRecord) || len(got) != 2 {
				t.Errorf("got %q, good %d, %v; want two records, good %d, errBadRecord", got, good, err, len(prefix))
			}
			// Other tests may allocate meanwhile, but not hundreds of MiB.
			if grew := after.TotalAlloc - before.TotalAlloc; grew > 64<<20 {
				t.Errorf("reading allocated %d bytes", grew)
			}
		})
	}
	for n := 0; n <= recordHeader; n++ {
		if _, _, _, err := readRecord(make([]byte, n)); !errors.Is(err, errBadRecord) {
			t.Errorf("%d bytes: got %v, want errBadRecord", n, err)
		}
	}
}

// FuzzReadRecords checks that any bytes read as records without a panic,
// and that the good prefix is exactly the records re-encoded.
func FuzzReadRecords(f *testing.F) {
	prefix, last := twoRecords()
	f.Add(append(slices.Clip(prefix), last...))
	f.Add(append(slices.Clip(prefix), last[:5]...))
	f.Add(appendRecord(nil, recUpdate, []byte{0, 0}))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 1})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		var again []byte
		good, err := readRecords(data, func(typ byte, payload []byte) error {
			again = appendRecord(again, typ, payload)
			return nil
		})
		if good < 0 || good > len(data) || (err == nil) != (good == len(data)) {
			t.Fatalf("good %d of %d bytes, err %v", good, len(data), err)
		}
		if !bytes.Equal(again, data[:good]) {
			t.Fatalf("records re-encode to % x, want % x", again, data[:good])
		}
	})
}

// ---- Document files ----

// writeDocFile writes a document file as the store does: a name record
// and updates. It returns the bytes written.
func writeDocFile(t *testing.T, path, name string, updates ...[]byte) []byte {
	t.Helper()
	data := appendRecord(nil, recName, []byte(name))
	for _, u := range updates {
		data = appendRecord(data, recUpdate, u)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return data
}

func TestReadDocFile(t *testing.T) {
	u1, u2 := unhex(t, yHello), unhex(t, yWorld)
	good := appendRecord(appendRecord(appendRecord(nil, recName, []byte("doc")), recUpdate, u1), recUpdate, u2)
	tests := []struct {
		name     string
		file     []byte // nil: no file
		want     [][]byte
		wantSize int
		err      error
		wantFile []byte // what is on disk after the read; nil: as before
	}{
		{"missing", nil, nil, 0, fs.ErrNotExist, nil},
		{"good", good, [][]byte{u1, u2}, len(good), nil, nil},
		{"name only", good[:recordHeader+4], nil, recordHeader + 4, nil, nil},
		{"another document", appendRecord(appendRecord(nil, recName, []byte("Doc")), recUpdate, u1), nil, 0, errWrongName, nil},
		{"no name record", appendRecord(nil, recUpdate, u1), nil, 0, errWrongName, nil},
		{"empty", []byte{}, nil, 0, errBadRecord, nil},
		{"torn name", good[:6], nil, 0, errBadRecord, nil},
		{"torn tail", good[:len(good)-3], [][]byte{u1}, len(good) - len(u2) - recordHeader - 1, errBadRecord, good[:len(good)-len(u2)-recordHeader-1]},
		{"garbage tail", append(slices.Clip(good), "garbage!!"...), [][]byte{u1, u2}, len(good), errBadRecord, good},
		{"later records of unknown type", appendRecord(slices.Clip(good), 9, []byte("x")), [][]byte{u1, u2}, len(good) + recordHeader + 2, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), docFileName("doc"))
			if tt.file != nil {
				if err := os.WriteFile(path, tt.file, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			got, size, err := readDocFile(path, "doc")
			if !errors.Is(err, tt.err) || (tt.err == nil) != (err == nil) || size != int64(tt.wantSize) || !slices.EqualFunc(got, tt.want, bytes.Equal) {
				t.Errorf("got %d updates, size %d, %v; want %d, size %d, %v", len(got), size, err, len(tt.want), tt.wantSize, tt.err)
			}
			if tt.file == nil {
				return
			}
			wantFile := bytesOr(tt.wantFile, tt.file)
			if onDisk, _ := os.ReadFile(path); !bytes.Equal(onDisk, wantFile) {
				t.Errorf("file after the read: % x, want % x", onDisk, wantFile)
			}
			if tt.wantFile == nil {
				return
			}
			// The tail is cut: a second read finds the good prefix only.
			got, size, err = readDocFile(path, "doc")
			if err != nil || size != int64(tt.wantSize) || !slices.EqualFunc(got, tt.want, bytes.Equal) {
				t.Errorf("second read: got %d updates, size %d, %v; want %d, size %d, nil", len(got), size, err, len(tt.want), tt.wantSize)
			}
		})
	}
}

// bytesOr is b if a is nil, else a.
func bytesOr(a, b []byte) []byte {
	if a == nil {
		return b
	}
	return a
}

func TestDocFileName(t *testing.T) {
	long := strings.Repeat("ü", 125) // 250 bytes
	names := []string{
		"doc", "Doc", "DOC", "dOc",
		"../../etc/passwd", "..", ".", "", "/", "a/b", `a\b`, "/abs/path",
		"nul\x00byte", "\x00", "new\nline", "tab\t", ".hidden", "-rf", "con", "aux.txt",
		long, long[:249] + "x", strings.Repeat("a", 250), strings.Repeat("A", 250),
		"日本語の文書", "emoji 🙂", "with space", "per%2Fcent", "trailing.", "trailing ",
	}
	seen := map[string]string{}
	folded := map[string]string{}
	for _, name := range names {
		file := docFileName(name)
		if file != docFileName(name) {
			t.Errorf("%q: not stable", name)
		}
		if strings.ContainsAny(file, `/\`+"\x00") || strings.HasPrefix(file, ".") || !utf8.ValidString(file) {
			t.Errorf("%q maps to %q: a separator, NUL, invalid UTF-8 or a leading dot", name, file)
		}
		if len(file) > 255 {
			t.Errorf("%q maps to %d bytes, want at most 255", name, len(file))
		}
		if !strings.HasSuffix(file, docFileExt) {
			t.Errorf("%q maps to %q, want the extension %s", name, file, docFileExt)
		}
		dir := "/data"
		if got := filepath.Join(dir, file); filepath.Dir(got) != dir {
			t.Errorf("%q maps to %q, outside %s", name, got, dir)
		}
		if other, ok := seen[file]; ok {
			t.Errorf("%q and %q both map to %q", name, other, file)
		}
		seen[file] = name
		// Case-insensitive file systems (macOS, Windows) fold case.
		if other, ok := folded[strings.ToLower(file)]; ok {
			t.Errorf("%q and %q map to %q and %q, equal on a case-insensitive file system", name, other, file, docFileName(other))
		}
		folded[strings.ToLower(file)] = name
	}
	for _, pair := range [][2]string{{"Doc", "doc"}, {"doc", "DOC"}, {"Doc", "DOC"}} {
		if a, b := docFileName(pair[0]), docFileName(pair[1]); strings.EqualFold(a, b) {
			t.Errorf("%q and %q map to %q and %q, equal but for case", pair[0], pair[1], a, b)
		}
	}
}

// TestDocFileNameOnDisk creates the files of names that differ only in
// case, or that would climb out of the directory, and finds them all
// inside it, one each.
func TestDocFileNameOnDisk(t *testing.T) {
	dir := t.TempDir()
	names := []string{"Doc", "doc", "DOC", "../../etc/passwd", "..", "/", "a/b"}
	for _, name := range names {
		writeDocFile(t, filepath.Join(dir, docFileName(name)), name)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(names) {
		t.Fatalf("got %d files, want %d", len(entries), len(names))
	}
	for _, name := range names {
		if _, _, err := readDocFile(filepath.Join(dir, docFileName(name)), name); err != nil {
			t.Errorf("%q: %v", name, err)
		}
	}
}

// ---- The owed list, the tools' functions, the default directory ----

func TestOwedRoundTrip(t *testing.T) {
	tests := []struct {
		name  string
		names []string
	}{
		{"none", nil},
		{"one", []string{"doc"}},
		{"odd names", []string{"", "a\nb", "nul\x00", "../x", strings.Repeat("ü", 125)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if got, err := readOwed(dir); got != nil || err != nil {
				t.Fatalf("no file: got %q, %v; want nothing", got, err)
			}
			if err := writeOwed(dir, tt.names); err != nil {
				t.Fatal(err)
			}
			got, err := readOwed(dir)
			if err != nil || !slices.Equal(got, tt.names) {
				t.Errorf("got %q, %v; want %q", got, err, tt.names)
			}
			if st, err := os.Stat(filepath.Join(dir, owedFile)); err != nil || st.Mode().Perm() != 0o600 {
				t.Errorf("owed list: %v, %v; want mode 0600", st, err)
			}
		})
	}
	t.Run("torn", func(t *testing.T) {
		dir := t.TempDir()
		data := appendRecord(appendRecord(nil, recName, []byte("a")), recName, []byte("b"))
		os.WriteFile(filepath.Join(dir, owedFile), data[:len(data)-1], 0o600)
		got, err := readOwed(dir)
		if !errors.Is(err, errBadRecord) || !slices.Equal(got, []string{"a"}) {
			t.Errorf("got %q, %v; want [a], errBadRecord", got, err)
		}
	})
}

// storeFixture writes a data directory as a store leaves it: documents
// with the updates given, and the owed list.
func storeFixture(t *testing.T, docs map[string][][]byte, owed ...string) string {
	t.Helper()
	dir := t.TempDir()
	for name, updates := range docs {
		writeDocFile(t, filepath.Join(dir, docFileName(name)), name, updates...)
	}
	if err := writeOwed(dir, owed); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestRemoveStored(t *testing.T) {
	u := unhex(t, yHello)
	tests := []struct {
		name     string
		remove   string
		err      error
		wantDocs []string
		wantOwed []string
	}{
		{"owed document", "a", nil, []string{"b", "c/d"}, []string{"c/d"}},
		{"document not owed", "b", nil, []string{"a", "c/d"}, []string{"a", "c/d"}},
		{"name with a slash", "c/d", nil, []string{"a", "b"}, []string{"a"}},
		{"missing", "nope", fs.ErrNotExist, []string{"a", "b", "c/d"}, []string{"a", "c/d"}},
		{"another case", "A", fs.ErrNotExist, []string{"a", "b", "c/d"}, []string{"a", "c/d"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := storeFixture(t, map[string][][]byte{"a": {u}, "b": {u}, "c/d": nil}, "a", "c/d")
			if err := removeStored(dir, tt.remove); !errors.Is(err, tt.err) || (err == nil) != (tt.err == nil) {
				t.Fatalf("got %v, want %v", err, tt.err)
			}
			list, err := listStored(dir)
			if err != nil {
				t.Fatal(err)
			}
			var docs []string
			for _, d := range list {
				docs = append(docs, d.name)
			}
			owed, err := readOwed(dir)
			if !slices.Equal(docs, tt.wantDocs) || !slices.Equal(owed, tt.wantOwed) || err != nil {
				t.Errorf("got documents %q, owed %q (%v); want %q, owed %q", docs, owed, err, tt.wantDocs, tt.wantOwed)
			}
		})
	}
}

func TestListStored(t *testing.T) {
	u := unhex(t, yHello)
	long := strings.Repeat("ü", 125)
	dir := storeFixture(t, map[string][][]byte{"b": {u}, "a": {u, u}, "Doc": nil, long: {u}}, "b", long)
	// Not documents: other files, and a .ydoc file without a name record.
	os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("hi"), 0o600)
	os.WriteFile(filepath.Join(dir, "x.ydoc"), []byte("garbage"), 0o600)
	os.Mkdir(filepath.Join(dir, "y.ydoc"), 0o700)

	list, err := listStored(dir)
	if err != nil {
		t.Fatal(err)
	}
	type row struct {
		name     string
		owed     bool
		readable bool
	}
	var got []row
	for _, d := range list {
		got = append(got, row{d.name, d.owed, d.err == nil})
		if d.err != nil {
			continue
		}
		st, err := os.Stat(filepath.Join(dir, docFileName(d.name)))
		if err != nil || st.Size() != d.bytes {
			t.Errorf("%q: %d bytes, want the file's size (%v, %v)", d.name, d.bytes, st, err)
		}
	}
	want := []row{{"Doc", false, true}, {"a", false, true}, {"b", true, true}, {"x.ydoc", false, false}, {"y.ydoc", false, false}, {long, true, true}}
	if !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	if list, err := listStored(filepath.Join(dir, "missing")); err != nil || len(list) != 0 {
		t.Errorf("a missing directory lists %v, %v; want nothing stored yet", list, err)
	}
	if _, err := listStored(filepath.Join(dir, "notes.txt")); err == nil {
		t.Error("a file as the directory lists without an error")
	}
}

func TestDefaultDataDir(t *testing.T) {
	if runtime.GOOS == "darwin" || runtime.GOOS == "windows" {
		t.Skip("XDG applies on other systems")
	}
	tests := []struct {
		name string
		env  map[string]string
		want string // "": an error
	}{
		{"XDG_DATA_HOME", map[string]string{"XDG_DATA_HOME": "/xdg", "HOME": "/home/ada"}, "/xdg/elva-service"},
		{"XDG_DATA_HOME without HOME", map[string]string{"XDG_DATA_HOME": "/xdg"}, "/xdg/elva-service"},
		{"relative XDG_DATA_HOME is ignored", map[string]string{"XDG_DATA_HOME": "xdg", "HOME": "/home/ada"}, "/home/ada/.local/share/elva-service"},
		{"HOME", map[string]string{"HOME": "/home/ada"}, "/home/ada/.local/share/elva-service"},
		{"relative XDG_DATA_HOME, no HOME", map[string]string{"XDG_DATA_HOME": "xdg"}, ""},
		{"neither", nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := defaultDataDir(func(k string) string { return tt.env[k] })
			if got != tt.want || (err == nil) != (tt.want != "") {
				t.Errorf("got %q, %v; want %q", got, err, tt.want)
			}
			if err != nil && !strings.Contains(err.Error(), "--data-dir") {
				t.Errorf("error %q does not say what to do (--data-dir)", err)
			}
		})
	}
}

// ---- The store goroutine, driven through its link ----

// storeRun is a store goroutine without a hub: the test plays the hub,
// sending storeOps on link.ops and reading link.replies.
type storeRun struct {
	st     *store
	link   *storeLink
	logs   *logBuffer
	drops  *drops
	quit   chan struct{}
	closed bool // link.ops closed
}

// startStore opens a store on dir and runs it until the test ends. set,
// if given, sets static fields (upstream, pushWhole) before it runs.
func startStore(t testing.TB, dir string, interval time.Duration, set func(*store)) *storeRun {
	t.Helper()
	logs := newLogBuffer()
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	r := &storeRun{link: newStoreLink(), logs: logs, drops: &drops{}, quit: make(chan struct{})}
	st, err := openStore(dir, interval, r.link, log, r.drops)
	if err != nil {
		t.Fatalf("openStore: %v", err)
	}
	r.st = st
	r.st.quit = r.quit
	r.st.retry = 20 * time.Millisecond // a failed write is tried again soon
	r.st.quiet = time.Hour             // no ping while editors type, unless a test asks
	if set != nil {
		set(r.st)
	}
	go r.st.run()
	t.Cleanup(func() {
		close(r.quit) // replies nobody reads are dropped
		r.stop(t)
		if t.Failed() {
			t.Logf("store log:\n%s", logs.String())
		}
	})
	return r
}

// upstreamStore sets a store up as one with a server.
func upstreamStore(s *store) { s.upstream = true }

// op hands the store one operation.
func (r *storeRun) op(t testing.TB, op storeOp) {
	t.Helper()
	select {
	case r.link.ops <- op:
	case <-time.After(testTimeout):
		t.Fatal("the store's queue stays full")
	}
}

// update hands the store update u of doc as a sync update message.
func (r *storeRun) update(t *testing.T, doc, u string, local bool) {
	t.Helper()
	r.op(t, storeOp{kind: opUpdate, doc: doc, data: updateMsg(unhex(t, u)), local: local})
}

// next returns the store's next reply.
func (r *storeRun) next(t testing.TB) storeReply {
	t.Helper()
	select {
	case rep := <-r.link.replies:
		return rep
	case <-time.After(testTimeout):
		t.Fatal("no reply from the store")
		return storeReply{}
	}
}

// syncEditor is the editor that sync's step 1s come from.
var syncEditor = &conn{}

// sync returns every reply the store gives before it has handled the
// operations sent so far: it sends a step 1 on doc from syncEditor and
// collects the replies that come before the answer. With an interval of
// 0 everything before the answer is also on disk. It is how the tests see
// that the store sent nothing, without waiting for a time.
func (r *storeRun) sync(t *testing.T, doc string) []storeReply {
	t.Helper()
	r.op(t, storeOp{kind: opStep1, doc: doc, data: emptyStep1, to: syncEditor})
	var before []storeReply
	for {
		rep := r.next(t)
		if rep.to == syncEditor {
			return before
		}
		before = append(before, rep)
	}
}

// stop closes the store's queue and waits until it has written
// everything and ended.
func (r *storeRun) stop(t testing.TB) {
	t.Helper()
	if !r.closed {
		close(r.link.ops)
		r.closed = true
	}
	select {
	case <-r.link.done:
	case <-time.After(testTimeout):
		t.Fatal("the store did not end")
	}
}

// errorLines counts the lines logged at level ERROR.
func (r *storeRun) errorLines() int {
	return strings.Count(r.logs.String(), "level=ERROR")
}

// svOf is the state vector of update u, decoded.
func svOf(t *testing.T, u []byte) map[uint64]uint64 {
	t.Helper()
	sv, err := stateVectorFromUpdate(u)
	if err != nil {
		t.Fatalf("state vector of % x: %v", u, err)
	}
	m, err := decodeStateVector(sv)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// wantMsg checks that rep is a sync message of subtype sub for to and
// returns its payload.
func wantMsg(t testing.TB, rep storeReply, sub uint64, to *conn) []byte {
	t.Helper()
	if rep.owedNews || rep.to != to || len(rep.data) < 2 || rep.data[0] != msgSync || uint64(rep.data[1]) != sub {
		t.Fatalf("got reply %+v, want a sync message of subtype %d to %p", rep, sub, to)
	}
	payload, err := syncPayload(rep.data)
	if err != nil {
		t.Fatalf("reply % x: %v", rep.data, err)
	}
	return payload
}

// wantCovers checks that state holds every update in hexes, and nothing
// else: its state vector is theirs together.
func wantCovers(t *testing.T, state []byte, hexes ...string) {
	t.Helper()
	var updates [][]byte
	for _, h := range hexes {
		u := unhex(t, h)
		ok, err := updateCovers(state, u)
		if err != nil || !ok {
			t.Errorf("state % x lacks update % x (%v)", state, u, err)
		}
		updates = append(updates, u)
	}
	all, err := mergeUpdates(updates)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := svOf(t, state), svOf(t, all); !maps.Equal(got, want) {
		t.Errorf("state vector %v, want %v", got, want)
	}
}

// wantOwed checks the owed list on disk.
func wantOwed(t *testing.T, dir string, want ...string) {
	t.Helper()
	got, err := readOwed(dir)
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("owed list on disk %q (%v), want %q", got, err, want)
	}
}

// storedState reads doc's file in dir and merges its updates.
func storedState(t *testing.T, dir, doc string) []byte {
	t.Helper()
	updates, _, err := readDocFile(filepath.Join(dir, docFileName(doc)), doc)
	if err != nil {
		t.Fatalf("read %q: %v", doc, err)
	}
	state, err := mergeUpdates(updates)
	if err != nil {
		t.Fatal(err)
	}
	return state
}

func TestStoreOpenAnswersWithItsStateVector(t *testing.T) {
	r := startStore(t, t.TempDir(), 0, nil)
	ed := &conn{}
	r.op(t, storeOp{kind: opOpen, doc: "doc", to: ed})
	if rep := r.next(t); !bytes.Equal(rep.data, unhex(t, "00 00 01 00")) || rep.to != ed || rep.doc != "doc" {
		t.Fatalf("empty store: got %+v, want a step 1 with the empty state vector (00 00 01 00) to the editor", rep)
	}
	r.update(t, "doc", yHello, true)
	r.update(t, "doc", yMap, true)
	r.update(t, "doc", yWorld, true)
	r.op(t, storeOp{kind: opOpen, doc: "doc", to: ed})
	sv, err := decodeStateVector(wantMsg(t, r.next(t), syncStep1, ed))
	if want := map[uint64]uint64{1: 11, 2: 1}; err != nil || !maps.Equal(sv, want) {
		t.Errorf("got state vector %v, %v; want %v", sv, err, want)
	}
}

func TestStoreAnswersStep1(t *testing.T) {
	r := startStore(t, t.TempDir(), 0, nil)
	for _, u := range []string{yHello, yWorld, yDelete, yMap} {
		r.update(t, "doc", u, true)
	}
	ed := &conn{}
	tests := []struct {
		name  string
		sv    map[uint64]uint64
		wants []string // updates the answer holds
		lacks []string // updates it does not hold
	}{
		{"empty state vector", nil, []string{yHello, yWorld, yDelete, yMap}, nil},
		{"has hello", map[uint64]uint64{1: 5}, []string{yWorld, yDelete, yMap}, []string{yHello}},
		{"has the map", map[uint64]uint64{2: 1}, []string{yHello, yWorld, yDelete}, []string{yMap}},
		{"has everything", map[uint64]uint64{1: 11, 2: 1}, []string{yDelete}, []string{yHello, yWorld, yMap}},
		{"has more", map[uint64]uint64{1: 20, 2: 5, 3: 1}, []string{yDelete}, []string{yHello, yWorld, yMap}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r.op(t, storeOp{kind: opStep1, doc: "doc", data: appendSyncMessage(nil, syncStep1, encodeStateVector(tt.sv)), to: ed})
			got := wantMsg(t, r.next(t), syncStep2, ed)
			for _, h := range tt.wants {
				if ok, err := updateCovers(got, unhex(t, h)); !ok || err != nil {
					t.Errorf("answer % x lacks % x (%v)", got, unhex(t, h), err)
				}
			}
			for _, h := range tt.lacks {
				if ok, _ := updateCovers(got, unhex(t, h)); ok {
					t.Errorf("answer % x holds % x, which the editor has", got, unhex(t, h))
				}
			}
		})
	}
}

// TestStoreWithoutUpstreamSendsNothingUpstream: without a server, no
// operation makes the store send anything upstream.
func TestStoreWithoutUpstreamSendsNothingUpstream(t *testing.T) {
	r := startStore(t, t.TempDir(), 0, nil)
	r.update(t, "doc", yHello, true)
	r.op(t, storeOp{kind: opStep1, doc: "doc", data: emptyStep1})
	r.op(t, storeOp{kind: opLinkUp, doc: "doc"})
	r.op(t, storeOp{kind: opIdle, doc: "doc"})
	r.op(t, storeOp{kind: opRepair, doc: "doc"})
	if got := r.sync(t, "doc"); len(got) != 0 {
		t.Errorf("got replies %+v, want none", got)
	}
}

func TestStoreMalformedIsDropped(t *testing.T) {
	r := startStore(t, t.TempDir(), 0, nil)
	ed := &conn{}
	r.update(t, "doc", yHello, true)
	for _, data := range [][]byte{
		{msgSync, syncUpdate, 9, 1},       // payload shorter than its length
		{msgSync},                         // no subtype
		{msgSync, syncUpdate, 3, 1, 1, 1}, // not an update
	} {
		r.op(t, storeOp{kind: opUpdate, doc: "doc", data: data, local: true})
	}
	r.op(t, storeOp{kind: opStep1, doc: "doc", data: []byte{msgSync, syncStep1, 2, 0x81}, to: ed})
	if got := r.sync(t, "doc"); len(got) != 0 {
		t.Errorf("got replies %+v to bad messages, want none", got)
	}
	r.op(t, storeOp{kind: opStep1, doc: "doc", data: emptyStep1, to: ed})
	wantCovers(t, wantMsg(t, r.next(t), syncStep2, ed), yHello)
	if n := r.drops.total(dropStoreMalformed); n < 3 {
		t.Errorf("counted %d malformed messages, want at least 3", n)
	}
}

func TestStoreRepairAsksForWhatItLacks(t *testing.T) {
	r := startStore(t, t.TempDir(), 0, upstreamStore)
	ed := &conn{}
	r.update(t, "doc", yHello, true)
	for _, to := range []*conn{ed, nil} {
		r.op(t, storeOp{kind: opRepair, doc: "doc", to: to})
		rep := r.next(t)
		if to == nil {
			// No editor at the hub, and the store still counted one (the
			// editor's repair above): its opIdle may be what was dropped,
			// so the hub is told first to hold the owed document.
			if !rep.owedNews || !rep.owed {
				t.Errorf("repair to the upstream: first reply %+v, want the hold", rep)
			}
			rep = r.next(t)
		}
		sv, err := decodeStateVector(wantMsg(t, rep, syncStep1, to))
		if want := map[uint64]uint64{1: 5}; err != nil || !maps.Equal(sv, want) {
			t.Errorf("repair to %p: got state vector %v, %v; want %v", to, sv, err, want)
		}
	}
	if n := r.drops.total(dropStoreRepair); n != 2 {
		t.Errorf("counted %d repairs, want 2", n)
	}
}

func TestStoreSurvivesRestart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	// An hour: nothing is written before the stop, which must write it all.
	r := startStore(t, dir, time.Hour, nil)
	for _, u := range []string{yHello, yWorld, yDelete} {
		r.update(t, "a", u, true)
	}
	r.update(t, "b", yMap, false)
	r.update(t, "Doc", yMap, true)
	r.stop(t)

	for _, doc := range []string{"a", "b", "Doc"} {
		if st, err := os.Stat(filepath.Join(dir, docFileName(doc))); err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%q: %v, %v; want a file of mode 0600", doc, st, err)
		}
	}
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("data directory: %v, %v; want mode 0700", st, err)
	}

	again := startStore(t, dir, 0, nil)
	ed := &conn{}
	tests := []struct {
		doc  string
		want []string
	}{
		{"a", []string{yHello, yWorld, yDelete}},
		{"b", []string{yMap}},
		{"Doc", []string{yMap}},
		{"doc", nil},
	}
	for _, tt := range tests {
		again.op(t, storeOp{kind: opStep1, doc: tt.doc, data: emptyStep1, to: ed})
		wantCovers(t, wantMsg(t, again.next(t), syncStep2, ed), tt.want...)
	}
}

func TestStoreCompactsAtStop(t *testing.T) {
	dir := t.TempDir()
	r := startStore(t, dir, time.Hour, nil)
	r.op(t, storeOp{kind: opOpen, doc: "doc", to: &conn{}})
	// An editor that reconnects sends its whole document again: the
	// same update, many times.
	for range 500 {
		r.update(t, "doc", yHello, true)
	}
	r.update(t, "doc", yWorld, true)
	r.stop(t)
	updates, size, err := readDocFile(filepath.Join(dir, docFileName("doc")), "doc")
	if err != nil || len(updates) != 1 || size > 100 {
		t.Fatalf("got %d updates in %d bytes, %v; want one merged update", len(updates), size, err)
	}
	wantCovers(t, updates[0], yHello, yWorld)
}

func TestStoreCutsTornTail(t *testing.T) {
	tests := []struct {
		name string
		tail []byte
	}{
		{"half a record", appendRecord(nil, recUpdate, []byte("an update"))[:7]},
		{"garbage", []byte("\x10\x00\x00\x00garbage after a crash")},
		{"zeros", make([]byte, 4096)}, // a file system that extended the file but not its data
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, docFileName("doc"))
			writeDocFile(t, path, "doc", unhex(t, yHello), unhex(t, yWorld))
			f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.Write(tt.tail)
			f.Close()

			r := startStore(t, dir, 0, nil)
			ed := &conn{}
			r.op(t, storeOp{kind: opStep1, doc: "doc", data: emptyStep1, to: ed})
			wantCovers(t, wantMsg(t, r.next(t), syncStep2, ed), yHello, yWorld)
			r.update(t, "doc", yMap, true)
			r.stop(t)
			if n := strings.Count(r.logs.String(), "torn or corrupt tail"); n != 1 {
				t.Errorf("got %d warnings of a torn tail, want 1", n)
			}
			if r.errorLines() != 0 {
				t.Errorf("errors logged for a torn tail")
			}
			if _, _, err := readDocFile(path, "doc"); err != nil {
				t.Errorf("after the restart: %v; want a good file", err)
			}
			wantCovers(t, storedState(t, dir, "doc"), yHello, yWorld, yMap)
		})
	}
}

func TestStoreUnusableFileIsWrittenAnew(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, docFileName("doc"))
	writeDocFile(t, path, "another", unhex(t, yMap))
	r := startStore(t, dir, 0, nil)
	r.update(t, "doc", yHello, true)
	r.sync(t, "doc")
	r.stop(t)
	if !strings.Contains(r.logs.String(), "unusable") {
		t.Errorf("no warning of an unusable file")
	}
	state := storedState(t, dir, "doc")
	wantCovers(t, state, yHello)
}

// ---- The server: what the store owes it ----

func TestStoreOwedUntilServerConfirms(t *testing.T) {
	dir := t.TempDir()
	r := startStore(t, dir, 0, upstreamStore)
	ed := &conn{}
	r.op(t, storeOp{kind: opOpen, doc: "doc", to: ed})
	wantMsg(t, r.next(t), syncStep1, ed)
	r.update(t, "doc", yHello, true)
	if got := r.sync(t, "doc"); len(got) != 0 {
		t.Fatalf("got replies %+v, want none", got)
	}
	wantOwed(t, dir, "doc")

	// The server's step 1 on connect: a step 2 with what it lacks, then
	// the ping.
	r.op(t, storeOp{kind: opStep1, doc: "doc", data: emptyStep1})
	wantCovers(t, wantMsg(t, r.next(t), syncStep2, nil), yHello)
	sv, err := decodeStateVector(wantMsg(t, r.next(t), syncStep1, nil))
	if want := map[uint64]uint64{1: 5}; err != nil || !maps.Equal(sv, want) {
		t.Errorf("ping: state vector %v, %v; want %v", sv, err, want)
	}
	// The server's answer to the ping. The editor is still there: the
	// hub hears of it when the editor leaves.
	r.serverStep2(t, "doc")
	if got := r.sync(t, "doc"); len(got) != 0 {
		t.Fatalf("got replies %+v, want none", got)
	}
	wantOwed(t, dir)
	r.logs.waitFor(t, "server has every edit")

	// An update from the server owes it nothing.
	r.update(t, "doc", yMap, false)
	r.sync(t, "doc")
	wantOwed(t, dir)
}

func TestStoreLateEditKeepsDocOwed(t *testing.T) {
	dir := t.TempDir()
	r := startStore(t, dir, 0, upstreamStore)
	r.editedAndPinged(t, "doc")
	r.update(t, "doc", yWorld, true) // before the ping's answer
	r.serverStep2(t, "doc")
	if got := r.sync(t, "doc"); len(got) != 0 {
		t.Fatalf("got replies %+v, want none: the late edit is not confirmed", got)
	}
	wantOwed(t, dir, "doc")

	// The last editor leaves: the hub is told to hold the document, and
	// the store pings again.
	r.op(t, storeOp{kind: opIdle, doc: "doc"})
	if rep := r.next(t); !rep.owedNews || !rep.owed || rep.doc != "doc" {
		t.Fatalf("got %+v, want news that doc owes the server", rep)
	}
	wantMsg(t, r.next(t), syncStep1, nil)
	r.serverStep2(t, "doc")
	if rep := r.next(t); !rep.owedNews || rep.owed {
		t.Fatalf("got %+v, want news that doc owes nothing", rep)
	}
	r.sync(t, "doc")
	wantOwed(t, dir)
}

// TestStoreLateEditAfterIdleIsConfirmed: the last editor's update comes
// while a ping is out, and the editor leaves before the answer. Nothing
// else will ping: the store must ping again when the answer comes, or the
// document stays owed (and held open upstream) until the next restart.
func TestStoreLateEditAfterIdleIsConfirmed(t *testing.T) {
	dir := t.TempDir()
	r := startStore(t, dir, 0, upstreamStore)
	r.editedAndPinged(t, "doc")
	r.update(t, "doc", yWorld, true)
	r.op(t, storeOp{kind: opIdle, doc: "doc"})
	if rep := r.next(t); !rep.owedNews || !rep.owed {
		t.Fatalf("got %+v, want news that doc owes the server", rep)
	}
	r.serverStep2(t, "doc")
	got := r.sync(t, "doc")
	if len(got) != 1 || !isStep1(got[0].data) || got[0].to != nil {
		t.Fatalf("after the answer to a ping that missed an edit: got replies %+v, want one step 1 to the server", got)
	}
	r.serverStep2(t, "doc")
	if rep := r.next(t); !rep.owedNews || rep.owed {
		t.Fatalf("got %+v, want news that doc owes nothing", rep)
	}
}

// TestStoreConfirmsWhileEditorsStay: with editors connected, a pause in
// their edits makes the store ping the server, so that a document stops
// being owed without waiting for its editors to leave; an edit during an
// outstanding ping is pinged for once that ping's answer comes. While
// editors stay the hub hears no news of it: the news could pass their
// leaving on its way.
func TestStoreConfirmsWhileEditorsStay(t *testing.T) {
	dir := t.TempDir()
	r := startStore(t, dir, 0, func(s *store) { s.upstream, s.quiet, s.every = true, time.Millisecond, time.Millisecond })
	r.editedAndPinged(t, "doc")
	r.serverStep2(t, "doc")
	if got := r.sync(t, "doc"); len(got) != 0 {
		t.Fatalf("got replies %+v, want none while editors stay", got)
	}
	wantOwed(t, dir)

	r.update(t, "doc", yWorld, true) // the editor types on, then pauses
	wantMsg(t, r.next(t), syncStep1, nil)
	r.update(t, "doc", yMap, true) // typed while the ping is out
	r.serverStep2(t, "doc")
	wantMsg(t, r.next(t), syncStep1, nil) // the pause's ping, after the answer
	r.serverStep2(t, "doc")
	if got := r.sync(t, "doc"); len(got) != 0 {
		t.Fatalf("got replies %+v, want none while editors stay", got)
	}
	wantOwed(t, dir)
	// The editor leaves: the hub is told that nothing is owed.
	r.op(t, storeOp{kind: opIdle, doc: "doc"})
	if rep := r.next(t); !rep.owedNews || rep.owed {
		t.Fatalf("got %+v, want news that doc owes nothing", rep)
	}
	if strings.Contains(r.logs.String(), "level=INFO msg=\"store: server has every edit\"") {
		t.Errorf("a confirmation while editors stay was logged at info; want debug:\n%s", r.logs.String())
	}
}

// TestStoreConfirmLater: the ping while editors stay comes confirmQuiet
// after the last edit, and not sooner than confirmEvery after the last
// such ping.
func TestStoreConfirmLater(t *testing.T) {
	now := time.Now()
	tests := []struct {
		name        string
		confirmedAt time.Time
		wantAfter   time.Duration // from now, at least
		wantBefore  time.Duration // and at most
	}{
		{"never pinged", time.Time{}, 2 * time.Second, 3 * time.Second},
		{"pinged long ago", now.Add(-time.Hour), 2 * time.Second, 3 * time.Second},
		{"pinged 10 s ago", now.Add(-10 * time.Second), 19 * time.Second, 21 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &store{quiet: 2 * time.Second, every: 30 * time.Second}
			d := &storedDoc{confirmedAt: tt.confirmedAt}
			s.confirmLater(d)
			defer s.confirmT.Stop()
			if wait := d.confirmAt.Sub(now); wait < tt.wantAfter || wait > tt.wantBefore {
				t.Errorf("ping due in %v, want %v to %v", wait, tt.wantAfter, tt.wantBefore)
			}
			if !s.confirmBy.Equal(d.confirmAt) {
				t.Errorf("timer fires at %v, want %v", s.confirmBy, d.confirmAt)
			}
		})
	}
}

func TestStoreUpstreamStep1(t *testing.T) {
	tests := []struct {
		name     string
		upstream bool
		local    bool
		want     []uint64 // the subtypes of the messages to the server
	}{
		{"no server", false, true, nil},
		{"nothing owed", true, false, []uint64{syncStep2}},
		{"owed: a step 2 and the ping", true, true, []uint64{syncStep2, syncStep1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := startStore(t, t.TempDir(), 0, func(s *store) { s.upstream = tt.upstream })
			r.update(t, "doc", yHello, tt.local)
			r.op(t, storeOp{kind: opStep1, doc: "doc", data: emptyStep1})
			var got []uint64
			for _, rep := range r.sync(t, "doc") {
				if rep.to != nil || rep.owedNews {
					t.Errorf("got %+v, want messages to the server", rep)
					continue
				}
				got = append(got, uint64(rep.data[1]))
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("got subtypes %v, want %v", got, tt.want)
			}
		})
	}
}

func TestStoreOwedFromEarlierRun(t *testing.T) {
	tests := []struct {
		name      string
		pushWhole bool
		want      []uint64 // the subtypes sent to the server on opLinkUp
	}{
		{"server sends its step 1", false, []uint64{syncStep1}},
		{"server sends no step 1 (elva)", true, []uint64{syncStep2, syncStep1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := storeFixture(t, map[string][][]byte{"a": {unhex(t, yHello)}, "b": {unhex(t, yMap)}}, "a", "b")
			r := startStore(t, dir, 0, func(s *store) { s.upstream, s.pushWhole = true, tt.pushWhole })
			if got := r.st.owedDocs(); !slices.Equal(got, []string{"a", "b"}) {
				t.Errorf("owedDocs: got %q, want [a b]", got)
			}
			for _, doc := range []string{"a", "b"} {
				if rep := r.next(t); !rep.owedNews || !rep.owed || rep.doc != doc {
					t.Fatalf("got %+v, want news that %q owes the server", rep, doc)
				}
			}
			r.op(t, storeOp{kind: opLinkUp, doc: "a"})
			var got []uint64
			for _, rep := range r.sync(t, "a") {
				if rep.to != nil || rep.owedNews {
					t.Fatalf("got %+v, want messages to the server", rep)
				}
				got = append(got, uint64(rep.data[1]))
				if isStep2(rep.data) {
					wantCovers(t, wantMsg(t, rep, syncStep2, nil), yHello)
				}
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("got subtypes %v, want %v", got, tt.want)
			}
			if !tt.pushWhole {
				// The server answers the step 1 and sends its own.
				r.op(t, storeOp{kind: opUpdate, doc: "a", data: appendSyncMessage(nil, syncStep2, emptyUpdate)})
				r.op(t, storeOp{kind: opStep1, doc: "a", data: emptyStep1})
				wantCovers(t, wantMsg(t, r.next(t), syncStep2, nil), yHello)
				wantMsg(t, r.next(t), syncStep1, nil) // the ping
			}
			r.op(t, storeOp{kind: opUpdate, doc: "a", data: appendSyncMessage(nil, syncStep2, emptyUpdate)})
			if rep := r.next(t); !rep.owedNews || rep.owed || rep.doc != "a" {
				t.Fatalf("got %+v, want news that a owes nothing", rep)
			}
			r.sync(t, "a")
			wantOwed(t, dir, "b")
		})
	}
}

// ---- Write failures ----

// TestStoreWriteFailure: with the data directory or a document's file
// blocked, the store logs one error, answers from memory, and writes
// everything once the obstacle is gone. (It retries every 20 ms here:
// the test waits for the log line that says it caught up.)
func TestStoreWriteFailure(t *testing.T) {
	tests := []struct {
		name  string
		block func(t *testing.T, dir string) (unblock func())
	}{
		{"data directory is a file", func(t *testing.T, dir string) func() {
			if err := os.WriteFile(dir, []byte("in the way"), 0o600); err != nil {
				t.Fatal(err)
			}
			return func() { os.Remove(dir) }
		}},
		{"document file is a directory", func(t *testing.T, dir string) func() {
			doc := filepath.Join(dir, docFileName("doc"))
			if err := os.MkdirAll(doc, 0o700); err != nil {
				t.Fatal(err)
			}
			return func() { os.Remove(doc) }
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			dir := filepath.Join(t.TempDir(), "data")
			unblock := tt.block(t, dir)
			r := startStore(t, dir, 0, nil)
			ed := &conn{}
			r.update(t, "doc", yHello, true)
			r.update(t, "doc", yWorld, true)
			r.op(t, storeOp{kind: opStep1, doc: "doc", data: emptyStep1, to: ed})
			wantCovers(t, wantMsg(t, r.next(t), syncStep2, ed), yHello, yWorld)
			r.logs.waitFor(t, "cannot write")
			r.update(t, "doc", yMap, true)
			r.sync(t, "doc")
			unblock()
			r.logs.waitFor(t, "caught up")
			r.op(t, storeOp{kind: opStep1, doc: "doc", data: emptyStep1, to: ed})
			wantCovers(t, wantMsg(t, r.next(t), syncStep2, ed), yHello, yWorld, yMap)
			r.stop(t)
			if n := r.errorLines(); n != 1 {
				t.Errorf("got %d error lines, want 1", n)
			}
			wantCovers(t, storedState(t, dir, "doc"), yHello, yWorld, yMap)
		})
	}
}

// TestStoreDirectoryComingBack: the data directory is missing at the
// start (a dangling symlink: a disk not mounted yet) and appears later
// with the files of an earlier run. What the store writes then must keep
// them: the document's earlier updates, and the documents owed.
func TestStoreDirectoryComingBack(t *testing.T) {
	t.Parallel()
	base := t.TempDir()
	dir, target := filepath.Join(base, "data"), filepath.Join(base, "disk")
	if err := os.Symlink(target, dir); err != nil {
		t.Fatal(err)
	}
	r := startStore(t, dir, 0, upstreamStore)
	r.update(t, "doc", yWorld, true)
	r.logs.waitFor(t, "cannot write")
	r.sync(t, "doc")

	// The disk comes back with what an earlier run wrote.
	earlier := storeFixture(t, map[string][][]byte{"doc": {unhex(t, yHello)}, "other": {unhex(t, yMap)}}, "other")
	if err := os.Rename(earlier, target); err != nil {
		t.Fatal(err)
	}
	r.logs.waitFor(t, "caught up")
	r.stop(t)
	wantCovers(t, storedState(t, dir, "doc"), yHello, yWorld)
	wantOwed(t, dir, "doc", "other")
}

// TestStoreStopWhileFailing: edits that could not be written when the
// relay stops are lost with the process; the store must say so at the
// stop (a warning or an error), even in a streak of failures that was
// logged already.
func TestStoreStopWhileFailing(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	os.WriteFile(dir, []byte("in the way"), 0o600)
	r := startStore(t, dir, 0, nil)
	r.update(t, "doc", yHello, true)
	r.sync(t, "doc")
	if n := r.errorLines(); n != 1 {
		t.Fatalf("got %d error lines before the stop, want 1", n)
	}
	drainLines(r.logs)
	r.stop(t)
	var notice []string
	for _, line := range drainLines(r.logs) {
		if strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
			notice = append(notice, line)
		}
	}
	if len(notice) != 1 || !strings.Contains(notice[0], "doc") {
		t.Errorf("at the stop: got %q, want one warning or error naming the document whose edits are lost", notice)
	}
}

// drainLines returns the log lines that nobody has waited for yet.
func drainLines(b *logBuffer) []string {
	var lines []string
	for {
		select {
		case line := <-b.lines:
			lines = append(lines, line)
		default:
			return lines
		}
	}
}

// diskFullChild is the environment variable that makes TestStoreDiskFull
// the child: its value is the data directory.
const diskFullChild = "ELVA_STORE_DISK_FULL_CHILD"

// diskFullLimit is the child's RLIMIT_FSIZE, in bytes.
const diskFullLimit = 4096

// TestStoreDiskFull runs the store in a child process (this test binary)
// whose files may not grow past diskFullLimit bytes: writes past it fail
// with EFBIG, as on a full disk (Go ignores SIGXFSZ). The child must not
// crash, must log the error once and keep answering from memory; the file
// it leaves holds the updates that fit.
func TestStoreDiskFull(t *testing.T) {
	if dir := os.Getenv(diskFullChild); dir != "" {
		runDiskFullChild(t, dir)
		return
	}
	if runtime.GOOS != "linux" {
		t.Skip("RLIMIT_FSIZE as on Linux")
	}
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestStoreDiskFull$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), diskFullChild+"="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("disk-full child: done")) {
		t.Fatalf("child: %v\n%s", err, out)
	}
	path := filepath.Join(dir, docFileName("big"))
	st, err := os.Stat(path)
	if err != nil || st.Size() > diskFullLimit {
		t.Fatalf("file %v, %v; want at most %d bytes", st, err, diskFullLimit)
	}
	updates, size, err := readDocFile(path, "big")
	if err != nil && !errors.Is(err, errBadRecord) {
		t.Fatalf("read: %v", err)
	}
	// The records that fit below the limit; the one that did not is cut.
	fit := (diskFullLimit - len(appendRecord(nil, recName, []byte("big")))) / len(appendRecord(nil, recUpdate, diskFullUpdate(0)))
	if len(updates) != fit {
		t.Fatalf("%d updates in %d bytes (%v), want the %d that fit", len(updates), size, err, fit)
	}
	for i, u := range updates {
		if want := diskFullUpdate(i); !bytes.Equal(u, want) {
			t.Errorf("update %d: % x…, want % x…", i, u[:16], want[:16])
		}
	}
}

// diskFullUpdate is the child's i-th update: 1500 bytes of client i+1.
func diskFullUpdate(i int) []byte {
	return yjsText(uint64(i+1), "t", strings.Repeat(string(rune('a'+i)), 1500))
}

// runDiskFullChild is the child of TestStoreDiskFull.
func runDiskFullChild(t *testing.T, dir string) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &lim); err != nil {
		t.Fatal(err)
	}
	lim.Cur = diskFullLimit
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &lim); err != nil {
		t.Fatal(err)
	}
	r := startStore(t, dir, 0, nil)
	ed := &conn{}
	const n = 5 // 7.5 kB
	for i := range n {
		r.op(t, storeOp{kind: opUpdate, doc: "big", data: updateMsg(diskFullUpdate(i)), local: true})
	}
	r.op(t, storeOp{kind: opStep1, doc: "big", data: emptyStep1, to: ed})
	state := wantMsg(t, r.next(t), syncStep2, ed)
	for i := range n {
		if ok, err := updateCovers(state, diskFullUpdate(i)); !ok || err != nil {
			t.Errorf("the answer lacks update %d (%v)", i, err)
		}
	}
	line := r.logs.waitFor(t, "cannot write")
	if !strings.Contains(line, "file too large") {
		t.Errorf("error line %q does not give the cause", line)
	}
	r.update(t, "big", yHello, true)
	r.sync(t, "big")
	if n := r.errorLines(); n != 1 {
		t.Errorf("got %d error lines, want 1", n)
	}
	r.stop(t)
	if !t.Failed() {
		fmt.Println("disk-full child: done")
	}
}

// ---- Through the hub and the tools ----

// TestStoreRelayRestart: an edit made through a standalone relay is there
// for an editor of a new relay on the same data directory.
func TestStoreRelayRestart(t *testing.T) {
	dir := t.TempDir()
	r := startRelay(t, "--data-dir", dir)
	a, b := join(t, r.addr, "doc"), join(t, r.addr, "doc")
	send(t, a, updateMsg(unhex(t, yHello)))
	receiveSkipping(t, b, func(msg []byte) bool { return bytes.Equal(msg, updateMsg(unhex(t, yHello))) })
	r.stop()
	if code := r.waitExit(t); code != 0 {
		t.Fatalf("exit status %d", code)
	}

	r = startRelay(t, "--data-dir", dir)
	c := join(t, r.addr, "doc")
	send(t, c, emptyStep1)
	got := receiveSkipping(t, c, isStep2)
	payload, err := syncPayload(got)
	if err != nil {
		t.Fatal(err)
	}
	wantCovers(t, payload, yHello)
}

func TestStoreTools(t *testing.T) {
	dataDir := t.TempDir()
	dir := filepath.Join(dataDir, "local") // the tools run without --server
	r := startStore(t, dir, 0, upstreamStore)
	r.update(t, "notes", yHello, true)
	r.update(t, "Doc", yMap, false)
	r.update(t, "a/b", yMap, false)
	r.stop(t)

	tests := []struct {
		name       string
		args       []string
		status     int
		stdout     []string // lines or parts of lines
		stderr     string
		wantOnDisk []string
	}{
		{"list", []string{"--list-docs"}, 0, []string{"3 documents in " + dir, `"notes"`, `owed   "notes"`, `"Doc"`, `"a/b"`}, "", []string{"Doc", "a/b", "notes"}},
		{"remove", []string{"--remove-doc", "Doc"}, 0, []string{`removed "Doc" from ` + dir}, "", []string{"a/b", "notes"}},
		{"remove owed", []string{"--remove-doc", "notes"}, 0, []string{`removed "notes"`}, "", []string{"a/b"}},
		{"remove missing", []string{"--remove-doc", "doc"}, 1, nil, `"doc"`, []string{"a/b"}},
		{"list missing directory", []string{"--list-docs", "--data-dir", filepath.Join(dataDir, "none")}, 0, []string{"0 documents in " + filepath.Join(dataDir, "none", "local")}, "", []string{"a/b"}},
		{"no store", []string{"--list-docs", "--no-store"}, 2, nil, "no store", []string{"a/b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			args := append([]string{"--data-dir", dataDir}, tt.args...)
			ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			defer cancel()
			status := run(ctx, args, &stdout, &stderr, func(string) string { return "" })
			if status != tt.status {
				t.Errorf("status %d, want %d; stdout:\n%s\nstderr:\n%s", status, tt.status, &stdout, &stderr)
			}
			for _, want := range tt.stdout {
				if !strings.Contains(stdout.String(), want) {
					t.Errorf("stdout lacks %q:\n%s", want, &stdout)
				}
			}
			if !strings.Contains(stderr.String(), tt.stderr) || (tt.stderr == "") != (stderr.Len() == 0) {
				t.Errorf("stderr %q, want it to say %q", &stderr, tt.stderr)
			}
			list, err := listStored(dir)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, d := range list {
				names = append(names, d.name)
			}
			if !slices.Equal(names, tt.wantOnDisk) {
				t.Errorf("stored: got %q, want %q", names, tt.wantOnDisk)
			}
		})
	}
	wantOwed(t, dir)
}

// ---- Size, and the answer to a joiner ----

const (
	// maxStoredRatio bounds a document's file after a stop against
	// Y.encodeStateAsUpdate of the same document (issue 11, "Size").
	maxStoredRatio = 8
	// storeOracleTimeout is the hard limit of TestStoreSizeFollowsContent's
	// oracle run, which takes a few seconds.
	storeOracleTimeout = 60 * time.Second
)

// storeOracleAnswer is the Go side's answer in updates-oracle.mjs's store
// mode: the update a store sends a joining editor.
type storeOracleAnswer struct {
	Name  string `json:"name"`
	State []byte `json:"state"`
}

// TestStoreSizeFollowsContent types a document in Yjs as 20,000
// single-character edits (updates-oracle.mjs's size case: mostly
// appending, runs in the middle, some deletions), each its own update
// from a local editor, through a store that then stops: the file it
// leaves must be at most maxStoredRatio times Y.encodeStateAsUpdate of the
// document. A second store on the directory answers a joining editor,
// and Yjs must make the same document of that answer.
func TestStoreSizeFollowsContent(t *testing.T) {
	requireOracle(t)
	_, inserts := oracleCounts(t)
	seed := cmp.Or(os.Getenv("ELVA_ORACLE_SEED"), "1")
	o := startOracle(t, storeOracleTimeout, "store", seed, strconv.Itoa(inserts))
	var typed oracleLine
	o.next(t, &typed)
	if typed.Kind != "store" || len(typed.Updates) == 0 || typed.StateBytes == 0 {
		t.Fatalf("updates-oracle: got a line of kind %q with %d updates, state %d bytes; want the store case", typed.Kind, len(typed.Updates), typed.StateBytes)
	}
	updateBytes := 0
	for _, u := range typed.Updates {
		updateBytes += len(u)
	}
	t.Logf("%d single-character updates, %d bytes; %d code points left; Y.encodeStateAsUpdate %d bytes",
		len(typed.Updates), updateBytes, utf8.RuneCountInString(typed.Text), typed.StateBytes)

	tests := []struct {
		name     string
		interval time.Duration
	}{
		// Nothing is on disk before the stop, which writes the merge.
		{"written at the stop", time.Hour},
		// The file grows while the editor types, as in a session of
		// minutes at the default interval; the stop compacts it.
		{"written as typed", time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			r := startStore(t, dir, tt.interval, nil)
			ed := &conn{}
			r.op(t, storeOp{kind: opOpen, doc: "typed", to: ed})
			wantMsg(t, r.next(t), syncStep1, ed)
			for _, u := range typed.Updates {
				r.op(t, storeOp{kind: opUpdate, doc: "typed", data: updateMsg(u), local: true})
			}
			stopping := time.Now()
			r.stop(t)
			took := time.Since(stopping)

			path := filepath.Join(dir, docFileName("typed"))
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			records, _, err := readDocFile(path, "typed")
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("file after the stop (which took %v): %d bytes, %d update records; %.2fx Y.encodeStateAsUpdate, %.3fx the updates",
				took.Round(time.Millisecond), st.Size(), len(records), float64(st.Size())/float64(typed.StateBytes), float64(st.Size())/float64(updateBytes))
			if st.Size() > maxStoredRatio*int64(typed.StateBytes) {
				t.Errorf("file is %d bytes, over %dx Y.encodeStateAsUpdate's %d", st.Size(), maxStoredRatio, typed.StateBytes)
			}

			again := startStore(t, dir, 0, nil)
			again.op(t, storeOp{kind: opStep1, doc: "typed", data: emptyStep1, to: ed})
			o.answer(t, storeOracleAnswer{Name: tt.name, State: wantMsg(t, again.next(t), syncStep2, ed)})
			var checked oracleLine
			o.next(t, &checked)
			if checked.Kind != "checked" {
				t.Fatalf("updates-oracle: got a line of kind %q, want its check of the answer", checked.Kind)
			}
			for _, f := range checked.Failures {
				t.Error(f)
			}
		})
	}
	o.finished = true // it exits 0 when its input ends
}

// joinerDocSize is the size of BenchmarkStoreAnswersJoiner's document.
const joinerDocSize = 1 << 20

// typedText returns updates in which clients take turns appending chunks
// of chunk bytes to the root Y.Text "text" until it holds size bytes.
// Each item's origin is the last character of the item before, another
// client's, so that no merge joins them: the document stays as many
// items as a text many people typed together.
func typedText(clients, chunk, size int) [][]byte {
	var updates [][]byte
	clocks := make([]uint64, clients)
	var originClient, originClock uint64
	for i := 0; i*chunk < size; i++ {
		c := i % clients
		client := uint64(c + 1)
		content := strings.Repeat(string(rune('a'+i%26)), chunk)
		u := appendVaruint([]byte{1, 1}, client) // one client, one struct
		u = appendVaruint(u, clocks[c])
		if i == 0 {
			u = append(u, 4, 1, 4) // ContentString, no origin; parent by key, 4 bytes
			u = append(u, "text"...)
		} else {
			u = append(u, 0x84) // ContentString with an origin
			u = appendVaruint(u, originClient)
			u = appendVaruint(u, originClock)
		}
		u = appendVaruint(u, uint64(len(content)))
		u = append(u, content...)
		updates = append(updates, append(u, 0)) // no deletions
		originClient, originClock = client, clocks[c]+uint64(chunk)-1
		clocks[c] += uint64(chunk)
	}
	return updates
}

// BenchmarkStoreAnswersJoiner measures how long a store takes to answer
// a joining editor's step 1 (the empty state vector) with its step 2 on
// a document of about 1 MB, from the step 1 entering its queue to the
// reply: with the document in memory (an editor has it open), and as the
// first joiner after a start (the file read and merged). reply-bytes is
// the step 2's size.
func BenchmarkStoreAnswersJoiner(b *testing.B) {
	docs := []struct {
		name    string
		updates [][]byte
	}{
		{"one insert", [][]byte{yjsText(1, "text", strings.Repeat("abcdefghij", joinerDocSize/10))}},
		{"4 clients typing 64-byte items", typedText(4, 64, joinerDocSize)},
	}
	for _, doc := range docs {
		b.Run(doc.name, func(b *testing.B) {
			dir := b.TempDir()
			r := startStore(b, dir, time.Hour, nil) // written once, at the stop
			for _, u := range doc.updates {
				r.op(b, storeOp{kind: opUpdate, doc: "big", data: updateMsg(u), local: true})
			}
			r.stop(b)
			b.Run("in memory", func(b *testing.B) {
				r := startStore(b, dir, time.Hour, nil)
				ed := &conn{}
				r.op(b, storeOp{kind: opOpen, doc: "big", to: ed})
				wantMsg(b, r.next(b), syncStep1, ed)
				var reply []byte
				b.ResetTimer()
				for range b.N {
					reply = answerJoiner(b, r, ed)
				}
				b.StopTimer()
				b.ReportMetric(float64(len(reply)), "reply-bytes")
				r.stop(b)
			})
			b.Run("after a start", func(b *testing.B) {
				ed := &conn{}
				var reply []byte
				b.ResetTimer()
				for range b.N {
					b.StopTimer()
					r := startStore(b, dir, time.Hour, nil)
					b.StartTimer()
					reply = answerJoiner(b, r, ed)
					b.StopTimer()
					r.stop(b)
					b.StartTimer()
				}
				b.StopTimer()
				b.ReportMetric(float64(len(reply)), "reply-bytes")
			})
		})
	}
}

// answerJoiner sends r a joining editor's step 1 for "big" and returns
// the step 2 it answers with; it fails unless that holds the document.
func answerJoiner(b *testing.B, r *storeRun, ed *conn) []byte {
	b.Helper()
	r.op(b, storeOp{kind: opStep1, doc: "big", data: emptyStep1, to: ed})
	reply := wantMsg(b, r.next(b), syncStep2, ed)
	if len(reply) < joinerDocSize {
		b.Fatalf("step 2 of %d bytes, want the whole document of %d", len(reply), joinerDocSize)
	}
	return reply
}

// TestStoreLetsGoOfUnconfirmedDocuments: a document without editors that
// owes the server edits is held open upstream only as long as the server
// may still confirm it (here 10 ms instead of 30 s); then the hub is told
// to let go, once, and the document stays owed for the next start.
func TestStoreLetsGoOfUnconfirmedDocuments(t *testing.T) {
	dir := t.TempDir()
	r := startStore(t, dir, 0, func(s *store) { s.upstream, s.wait = true, 10*time.Millisecond })
	r.op(t, storeOp{kind: opOpen, doc: "d", to: syncEditor})
	if rep := r.next(t); rep.to != syncEditor || !isStep1(rep.data) {
		t.Fatalf("open answered with %+v, want a step 1", rep)
	}
	r.update(t, "d", yHello, true)
	r.op(t, storeOp{kind: opIdle, doc: "d"})
	if rep := r.next(t); !rep.owedNews || !rep.owed {
		t.Fatalf("idle answered with %+v, want the hub told to hold the document", rep)
	}
	// A server that keeps nothing never sends a step 1, so no ping goes.
	if rep := r.next(t); !rep.owedNews || rep.owed || rep.doc != "d" {
		t.Fatalf("then %+v, want the hub told to let go of d", rep)
	}
	r.logs.waitFor(t, "did not confirm")
	if got := r.sync(t, "d"); len(got) != 0 {
		t.Errorf("after letting go, replies %+v", got)
	}
	wantOwed(t, dir, "d")
}

// TestStoreChecksWhatACrashedRunWrote: after a run that did not stop
// cleanly (its marker file is still there), the files it wrote are read
// at start, so that a torn tail is warned about and cut then, and older
// files are left alone; a clean stop removes the marker.
func TestStoreChecksWhatACrashedRunWrote(t *testing.T) {
	u := unhex(t, yHello)
	dir := storeFixture(t, map[string][][]byte{"old": {u}, "torn": {u}})
	torn := filepath.Join(dir, docFileName("torn"))
	appendToFile(t, torn, []byte{9, 0, 0, 0, 1, 2}) // half a record
	appendToFile(t, filepath.Join(dir, docFileName("old")), []byte{9, 0, 0})
	start := time.Now().Add(-time.Hour)
	os.WriteFile(filepath.Join(dir, runningFile), nil, 0o600)
	for path, at := range map[string]time.Time{
		filepath.Join(dir, runningFile):        start,
		filepath.Join(dir, docFileName("old")): start.Add(-time.Hour), // before that run
		torn:                                   start.Add(time.Minute),
	} {
		if err := os.Chtimes(path, at, at); err != nil {
			t.Fatal(err)
		}
	}
	r := startStore(t, dir, 0, nil)
	logs := r.logs.String() // what openStore logged, before any operation
	if n := strings.Count(logs, "torn or corrupt tail"); n != 1 || !strings.Contains(logs, `doc=torn`) {
		t.Errorf("%d torn-tail warnings at start, want one for torn:\n%s", n, logs)
	}
	if !strings.Contains(logs, "did not stop cleanly") {
		t.Errorf("no line about the unclean stop:\n%s", logs)
	}
	if _, err := os.Stat(filepath.Join(dir, runningFile)); err != nil {
		t.Errorf("no marker while running: %v", err)
	}
	r.stop(t)
	if _, err := os.Stat(filepath.Join(dir, runningFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("marker after a clean stop: %v", err)
	}
}

// editedAndPinged plays an editor that opens doc and makes one edit, and a
// server whose step 1 the store answers: it checks the store's step 2 and
// the ping step 1 that follows it.
func (r *storeRun) editedAndPinged(t *testing.T, doc string) {
	t.Helper()
	r.op(t, storeOp{kind: opOpen, doc: doc, to: &conn{}})
	r.next(t)
	r.update(t, doc, yHello, true)
	r.op(t, storeOp{kind: opStep1, doc: doc, data: emptyStep1})
	wantMsg(t, r.next(t), syncStep2, nil)
	wantMsg(t, r.next(t), syncStep1, nil) // the ping
}

// serverStep2 plays the server's answer to a step 1: an empty step 2.
func (r *storeRun) serverStep2(t *testing.T, doc string) {
	t.Helper()
	r.op(t, storeOp{kind: opUpdate, doc: doc, data: appendSyncMessage(nil, syncStep2, emptyUpdate)})
}

// TestStoreDirInUse: a store directory whose marker names another live
// process is refused, by the relay (exit 1, said on stderr also when it
// logs to a file) and by --remove-doc; once that process is gone its
// marker is a run that did not stop cleanly, and the store takes over.
func TestStoreDirInUse(t *testing.T) {
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Skipf("no sleep(1) to stand for another relay: %v", err)
	}
	defer func() { other.Process.Kill(); other.Wait() }()
	dataDir := t.TempDir()
	dir := filepath.Join(dataDir, "local")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	marker := filepath.Join(dir, runningFile)
	os.WriteFile(marker, []byte(fmt.Sprintf("%d\n", other.Process.Pid)), 0o600)

	_, err := openStore(dir, 0, newStoreLink(), slog.New(slog.NewTextHandler(io.Discard, nil)), &drops{})
	var inUse *storeInUseError
	if !errors.As(err, &inUse) || inUse.pid != other.Process.Pid {
		t.Fatalf("openStore on a held directory: %v, want a storeInUseError naming pid %d", err, other.Process.Pid)
	}
	if err := removeStored(dir, "notes"); err == nil || !strings.Contains(err.Error(), "stop it first") {
		t.Errorf("--remove-doc on a held directory: %v, want a refusal", err)
	}
	var stderr bytes.Buffer
	code := run(context.Background(), []string{"--data-dir", dataDir, "--log", filepath.Join(t.TempDir(), "relay.log"), "127.0.0.1", "0"}, io.Discard, &stderr, func(string) string { return "" })
	if code != 1 || !strings.Contains(stderr.String(), "in use by another elva-service") {
		t.Errorf("the relay on a held directory: exit %d, stderr %q; want 1 and the reason", code, stderr.String())
	}

	other.Process.Kill()
	other.Wait()
	r := startStore(t, dir, 0, nil)
	r.logs.waitFor(t, "did not stop cleanly")
	if pid, _, err := readMarker(marker); err != nil || pid != os.Getpid() {
		t.Errorf("marker after the take-over: pid %d, %v; want %d", pid, err, os.Getpid())
	}
}
