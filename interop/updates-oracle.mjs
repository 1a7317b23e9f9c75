// Differential oracle for the docless update functions of codec.go
// (stateVectorFromUpdate, mergeUpdates, diffUpdate), driven by
// TestUpdatesMatchYjs:
//
//   node updates-oracle.mjs SEED DOCS SIZE_INSERTS
//
// It makes DOCS random documents, seeded with SEED, each edited by 2-4
// concurrent Y.Docs that exchange updates at random moments: Y.Text with
// formatting and embeds, Y.Map and Y.Array with every kind of value and
// nested types, XML, subdocuments, and legacy ContentJSON items that it
// encodes by hand (no Yjs API writes them any more). Per document it
// writes one request line; the answers come in order, and it sends the
// next request before it reads the last answer, never more than two
// ahead, so that both sides work at once. (The Go side reads every line
// as it comes, so neither side blocks on a full pipe.) Lines are JSON,
// bytes in base64.
//
// Request {"kind":"doc"}: the document's incremental updates (each
// client's own, and some echoes of remote ones), a subset of them, three
// state vectors (empty, a mid-way snapshot's, the final one) and what
// Yjs makes of them: Y.mergeUpdates, Y.encodeStateVectorFromUpdate,
// Y.diffUpdate. The Go side checks its own state vectors and diffs
// against those, and answers with its merges and diffs, which this
// script applies to fresh Y.Docs and compares with Yjs's: every shared
// type's content (formatting, XML strings, subdocuments, binary values
// included), the state vector and the delete set.
//
// Then one {"kind":"size"} request: SIZE_INSERTS single-character inserts
// into one Y.Text, each its own update, mostly at the end; the answer's
// merge must give the same document. Last, {"kind":"done"} with the
// counts and the first failures; then it exits.
//
//   node updates-oracle.mjs store SEED SIZE_INSERTS
//
// The store mode, for TestStoreSizeFollowsContent: one {"kind":"store"}
// line with the size case's document typed as above (its updates, the
// length of Y.encodeStateAsUpdate and the text). Then each answer
// {"name", "state": what a store sends a joining editor} must give the
// same document; the script says so in a {"kind":"checked"} line with the
// failures, and exits when its input ends.

import * as readline from 'node:readline'
import * as Y from 'yjs'
import * as encoding from 'lib0/encoding'

const storeMode = process.argv[2] === 'store'
const args = process.argv.slice(storeMode ? 3 : 2)
const seed = Number(args[0] ?? 1)
const docCount = storeMode ? 0 : Number(args[1] ?? 2000)
const sizeInserts = Number(args[storeMode ? 1 : 2] ?? 20000)

// The Go test has a hard timeout too; this one only keeps an orphan from
// living on.
setTimeout(() => {
  console.error('updates-oracle: timeout')
  process.exit(3)
}, 170_000).unref()

const REMOTE = 'remote'
const b64 = u => Buffer.from(u).toString('base64')
const unb64 = s => new Uint8Array(Buffer.from(s, 'base64'))

// mulberry32: a small seeded PRNG, so that a seed names a run.
const prng = s => {
  let a = s >>> 0
  const next = () => {
    a = (a + 0x6D2B79F5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
  const int = n => Math.floor(next() * n) // 0..n-1
  return { next, int, chance: p => next() < p, pick: a => a[int(a.length)] }
}

const CHARS = ['a', 'b', 'c', 'x', ' ', 'é', '中', '😀', '👍🏽', '\n']
const word = (r, max = 4) => {
  let s = ''
  for (let n = 1 + r.int(max); n > 0; n--) s += r.pick(CHARS)
  return s
}

const ATTRS = [{ bold: true }, { italic: true }, { color: '#f00' }, { bold: null }, { link: { href: 'x', n: 1 } }]

const primitive = r => r.pick([
  () => r.int(1000) - 500,
  () => r.next() * 1e6,
  () => 2 ** 40 + r.int(10),
  () => word(r),
  () => r.chance(0.5),
  () => null,
  () => ({ x: [1, 'two', { y: null, z: [true] }], n: r.int(9) }),
  () => [r.int(5), word(r), [], {}],
  () => new Uint8Array([r.int(256), 0, 255]),
  () => ({ big: BigInt(r.int(1e6)) * 2n ** 40n }), // nor a bigint itself
  () => [undefined, r.int(3)] // Y.Array takes no undefined itself
])()

// value is anything that Y.Array and Y.Map take: plain values, binary,
// nested types, now and then a subdocument.
const value = (r, ctx) => {
  const k = r.int(20)
  if (k < 12) return primitive(r)
  if (k < 14) return new Y.Array()
  if (k < 16) return new Y.Map()
  if (k < 18) return new Y.Text(word(r))
  if (k < 19) return r.pick([new Y.XmlText(word(r)), new Y.XmlFragment(), new Y.XmlHook('hook'), new Y.XmlElement('div')])
  return new Y.Doc({ guid: `sub-${ctx.doc}-${ctx.n++}`, meta: { n: ctx.n } })
}

// fill gives a fresh nested type a first content once it is in the doc.
const fill = (r, v) => {
  if (v instanceof Y.Array) v.push([primitive(r), primitive(r)])
  else if (v instanceof Y.Map) v.set('k', primitive(r))
}

// nestedTypes lists the Y types nested in m and a.
const nestedTypes = (doc) => {
  const out = []
  const walk = v => {
    if (v instanceof Y.Map || v instanceof Y.Array) {
      out.push(v)
      v.forEach(walk)
    } else if (v instanceof Y.Text) {
      out.push(v)
    }
  }
  doc.getMap('map').forEach(walk)
  doc.getArray('arr').forEach(walk)
  return out
}

const editText = (r, t) => {
  const len = t.length
  const k = r.int(10)
  if (k < 5 || len === 0) {
    if (r.chance(0.3)) t.insert(r.int(len + 1), word(r), r.pick(ATTRS))
    else t.insert(r.int(len + 1), word(r))
  } else if (k < 7) {
    const at = r.int(len)
    t.delete(at, 1 + r.int(Math.min(4, len - at)))
  } else if (k < 9) {
    const at = r.int(len)
    t.format(at, 1 + r.int(len - at), r.pick(ATTRS))
  } else {
    t.insertEmbed(r.int(len + 1), { image: word(r), w: r.int(99) })
  }
}

const editArray = (r, a, ctx) => {
  const len = a.length
  if (len > 0 && r.chance(0.3)) {
    const at = r.int(len)
    a.delete(at, 1 + r.int(Math.min(3, len - at)))
    return
  }
  const vals = []
  for (let n = 1 + r.int(3); n > 0; n--) vals.push(value(r, ctx))
  a.insert(r.int(len + 1), vals)
  vals.forEach(v => fill(r, v))
}

const editMap = (r, m, ctx) => {
  const key = r.pick(['a', 'b', 'c', 'd'])
  if (m.has(key) && r.chance(0.2)) {
    m.delete(key)
    return
  }
  const v = value(r, ctx)
  m.set(key, v)
  fill(r, v)
}

const editXml = (r, doc) => {
  const frag = doc.getXmlFragment('xml')
  const k = r.int(6)
  if (k < 2 || frag.length === 0) {
    const el = new Y.XmlElement(r.pick(['p', 'h1', 'li']))
    frag.insert(r.int(frag.length + 1), [el])
    el.setAttribute('class', word(r))
    el.insert(0, [new Y.XmlText(word(r))])
    return
  }
  const el = frag.get(r.int(frag.length))
  if (k === 2) {
    frag.delete(r.int(frag.length), 1)
  } else if (k === 3 && el instanceof Y.XmlElement) {
    el.setAttribute(r.pick(['class', 'id']), word(r))
  } else if (el instanceof Y.XmlElement && el.length > 0 && el.get(0) instanceof Y.XmlText) {
    editText(r, el.get(0))
  }
}

// legacyUpdate encodes by hand what old Yjs versions wrote and no API
// writes now: ContentJSON items (ref 2) in the array "legacy", joined by
// origin, and deleted-content items (ref 1) between them. from and to
// pick the structs (0..4), so that the run can be split over updates.
const legacyUpdate = (client, from, to) => {
  const json = [[1, 'two', { three: [3] }], [null, 'undefined'], ['é😀', 4.5]]
  const structs = [
    { ref: 2, elems: json[0] },
    { ref: 2, elems: json[1] },
    { ref: 1, len: 2 },
    { ref: 1, len: 3 },
    { ref: 2, elems: json[2] }
  ]
  let clock = 0
  const clocks = structs.map(s => { const c = clock; clock += s.elems ? s.elems.length : s.len; return c })
  const enc = encoding.createEncoder()
  encoding.writeVarUint(enc, 1)
  encoding.writeVarUint(enc, to - from)
  encoding.writeVarUint(enc, client)
  encoding.writeVarUint(enc, clocks[from])
  for (let i = from; i < to; i++) {
    const s = structs[i]
    if (i === 0) {
      encoding.writeUint8(enc, s.ref)
      encoding.writeVarUint(enc, 1)
      encoding.writeVarString(enc, 'legacy')
    } else {
      encoding.writeUint8(enc, s.ref | 0x80)
      encoding.writeVarUint(enc, client)
      encoding.writeVarUint(enc, clocks[i] - 1)
    }
    if (s.elems) {
      encoding.writeVarUint(enc, s.elems.length)
      // 'undefined' stands for an undefined slot
      s.elems.forEach(e => encoding.writeVarString(enc, e === 'undefined' ? 'undefined' : JSON.stringify(e)))
    } else {
      encoding.writeVarUint(enc, s.len)
    }
  }
  encoding.writeVarUint(enc, 0) // empty delete set
  return encoding.toUint8Array(enc)
}

// ser is a JSON-able picture of a value in a document, nested types and
// subdocuments included.
const ser = v => {
  if (v === undefined) return { undef: true }
  if (v instanceof Y.Doc) return { subdoc: v.guid, meta: v.meta ?? null, autoLoad: v.autoLoad }
  if (v instanceof Uint8Array) return { bin: Array.from(v) }
  if (v instanceof Y.XmlText) return { xmltext: v.toString(), delta: serDelta(v.toDelta()) }
  if (v instanceof Y.XmlElement) {
    return { xml: v.nodeName, attrs: ser(v.getAttributes()), children: v.toArray().map(ser), str: v.toString() }
  }
  if (v instanceof Y.XmlHook) return { hook: v.hookName, map: ser(v.toJSON()) }
  if (v instanceof Y.XmlFragment) return { frag: v.toArray().map(ser), str: v.toString() }
  if (v instanceof Y.Text) return { text: serDelta(v.toDelta()) }
  if (v instanceof Y.Array) return { array: v.toArray().map(ser) }
  if (v instanceof Y.Map) {
    const o = {}
    Array.from(v.keys()).sort().forEach(k => { o[k] = ser(v.get(k)) })
    return { map: o }
  }
  if (Array.isArray(v)) return v.map(ser)
  if (v !== null && typeof v === 'object') {
    const o = {}
    Object.keys(v).sort().forEach(k => { o[k] = ser(v[k]) })
    return o
  }
  if (typeof v === 'number' && !Number.isFinite(v)) return { num: String(v) }
  if (typeof v === 'bigint') return { bigint: String(v) }
  return v
}
const serDelta = d => d.map(op => ({ insert: ser(op.insert), attributes: ser(op.attributes ?? null) }))

// content is the content of every shared type of doc.
const content = doc => ({
  text: ser(doc.getText('text')),
  map: ser(doc.getMap('map')),
  arr: ser(doc.getArray('arr')),
  xml: ser(doc.getXmlFragment('xml')),
  legacy: ser(doc.getArray('legacy'))
})

// state is everything the comparisons look at in doc.
const state = doc => JSON.stringify({
  ...content(doc),
  sv: Array.from(Y.decodeStateVector(Y.encodeStateVector(doc)).entries()).sort((a, b) => a[0] - b[0]),
  snapshot: b64(Y.encodeSnapshot(Y.snapshot(doc))),
  pending: doc.store.pendingStructs !== null ? Array.from(doc.store.pendingStructs.missing.entries()).sort() : null,
  pendingDs: doc.store.pendingDs !== null
})

// docFrom applies updates in turn to a fresh Y.Doc. A guid of our own
// spares a random UUID, which costs more than the rest of the run.
const docFrom = (...updates) => {
  const doc = new Y.Doc({ guid: 'oracle' })
  updates.forEach(u => Y.applyUpdate(doc, u))
  return doc
}

// makeDoc edits a document with concurrent clients and returns its
// updates and the mid-way snapshot.
const makeDoc = (i) => {
  const r = prng(seed * 1_000_003 + i)
  const ctx = { doc: i, n: 0 }
  const clients = []
  const updates = []
  const nclients = 2 + r.int(3)
  for (let k = 0; k < nclients; k++) {
    const doc = new Y.Doc({ gc: r.chance(0.7), guid: `doc-${i}` })
    doc.clientID = 1 + k * 1000 + r.int(1000) // distinct, some orders of client IDs
    doc.on('update', (u, origin) => {
      if (origin !== REMOTE || r.chance(0.1)) updates.push(u)
    })
    clients.push(doc)
  }
  const sync = (a, b) => Y.applyUpdate(b, Y.encodeStateAsUpdate(a, Y.encodeStateVector(b)), REMOTE)
  if (r.chance(0.15)) {
    const split = 1 + r.int(4)
    const l1 = legacyUpdate(7777, 0, split)
    const l2 = legacyUpdate(7777, split, 5)
    updates.push(l1, l2)
    Y.applyUpdate(clients[0], l1, REMOTE)
    Y.applyUpdate(clients[0], l2, REMOTE)
  }
  const ops = 5 + r.int(45)
  let mid = null
  for (let op = 0; op < ops; op++) {
    if (op === Math.floor(ops / 2)) mid = Y.mergeUpdates(updates)
    const doc = r.pick(clients)
    const k = r.int(100)
    const edit = () => {
      const k2 = r.int(100)
      if (k2 < 35) editText(r, doc.getText('text'))
      else if (k2 < 55) editMap(r, doc.getMap('map'), ctx)
      else if (k2 < 72) editArray(r, doc.getArray('arr'), ctx)
      else if (k2 < 85) {
        const nested = nestedTypes(doc)
        if (nested.length > 0) {
          const t = r.pick(nested)
          if (t instanceof Y.Text) editText(r, t)
          else if (t instanceof Y.Array) editArray(r, t, ctx)
          else editMap(r, t, ctx)
        }
      } else if (k2 < 93) editXml(r, doc)
      else {
        const a = doc.getArray('legacy')
        if (a.length > 0 && r.chance(0.5)) a.delete(r.int(a.length), 1)
        else a.insert(r.int(a.length + 1), [primitive(r)])
      }
    }
    if (k < 15) {
      const a = r.pick(clients)
      const b = r.pick(clients)
      if (a !== b) sync(a, b)
    } else if (k < 25) {
      doc.transact(() => { for (let n = 2 + r.int(3); n > 0; n--) edit() })
    } else {
      edit()
    }
  }
  if (mid === null) mid = Y.mergeUpdates(updates)
  return { updates, mid }
}

const failures = []
let failed = 0
const fail = (what) => {
  failed++
  if (failures.length < 20) failures.push(what)
}
const stats = { docs: 0, updates: 0, goMergedBytes: 0, yjsMergedBytes: 0, stateBytes: 0, checks: 0, surrogateSplitDocs: 0, looseMatches: 0, pendingDiffers: 0 }

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity })
const answers = rl[Symbol.asyncIterator]()
const send = req => process.stdout.write(JSON.stringify(req) + '\n')
const receive = async () => {
  const { value: line, done } = await answers.next()
  if (done) throw new Error('go side closed stdin')
  return JSON.parse(line)
}

// same compares got with want and records a failure naming what and i
// unless they match. loose allows a match of the two with every
// surrogate and U+FFFD as '?': a client that splits a surrogate pair
// keeps U+FFFD in both halves where the others keep the character (yjs
// issue #248), so one ID can name two contents in one document's
// updates, and merges (Yjs's, Go's) and applications of them in other
// orders may keep either.
const same = (i, what, got, want, loose = false) => {
  stats.checks++
  if (got === want) return
  const blur = s => s.replace(/[\uD800-\uDFFF\uFFFD]/g, '?')
  if (loose && blur(got) === blur(want)) {
    stats.looseMatches++
    return
  }
  let at = 0
  while (got[at] === want[at]) at++
  const from = Math.max(0, at - 150)
  fail(`doc ${i} seed ${seed}: ${what}, from character ${from}:\n got  ${got.slice(from, at + 300)}\n want ${want.slice(from, at + 300)}`)
}

// splitsSurrogates reports whether some update holds a U+FFFD: only a
// split surrogate pair makes one, as no edit inserts it.
const splitsSurrogates = updates => updates.some(u => Y.decodeUpdate(u).structs.some(s => s.content instanceof Y.ContentString && s.content.str.includes('\uFFFD')))

// checkDoc makes document i and sends its request; the answer is read
// and checked by the function it returns, so that the Go side works on
// one document while this script makes the next.
const checkDoc = (i) => {
  const { updates, mid } = makeDoc(i)
  const r = prng(seed * 7919 + i)
  const yMerged = Y.mergeUpdates(updates)
  const final = docFrom(yMerged)
  const want = state(final)
  const stateUpdate = Y.encodeStateAsUpdate(final)
  const midDoc = docFrom(mid)
  const svs = [new Uint8Array([0]), Y.encodeStateVector(midDoc), Y.encodeStateVector(final)]
  const subset = updates.map((_, k) => k).filter(() => r.chance(0.7))
  const rest = updates.map((_, k) => k).filter(k => !subset.includes(k))
  const ySubset = Y.mergeUpdates(subset.map(k => updates[k]))
  const svOf = [...updates, yMerged, stateUpdate, ySubset]
  const diffOf = [yMerged, stateUpdate]
  const req = {
    kind: 'doc',
    i,
    updates: updates.map(b64),
    subset,
    svs: svs.map(b64),
    yjsMerged: b64(yMerged),
    state: b64(stateUpdate),
    yjsSubset: b64(ySubset),
    finalSV: b64(svs[2]),
    // Y.encodeStateVectorFromUpdate of every update, then of yjsMerged,
    // state and yjsSubset
    yjsSV: svOf.map(u => b64(Y.encodeStateVectorFromUpdate(u))),
    // Y.diffUpdate of yjsMerged and of state against each of svs
    yjsDiffs: diffOf.map(u => svs.map(sv => b64(Y.diffUpdate(u, sv))))
  }
  send(req)
  return async () => {
    const ans = await receive()
    checkAnswer(i, ans, { updates, mid, yMerged, want, stateUpdate, svs, subset, rest, ySubset })
  }
}

const checkAnswer = (i, ans, { updates, mid, yMerged, want, stateUpdate, svs, subset, rest, ySubset }) => {
  stats.docs++
  stats.updates += updates.length
  if (ans.error) {
    fail(`doc ${i} seed ${seed}: go: ${ans.error}`)
    return
  }
  const merged = unb64(ans.merged)
  stats.goMergedBytes += merged.length
  stats.yjsMergedBytes += yMerged.length
  stats.stateBytes += stateUpdate.length
  const loose = splitsSurrogates(updates)
  if (loose) stats.surrogateSplitDocs++
  same(i, 'go merge', state(docFrom(merged)), want, loose)
  same(i, 'go merge of merges', state(docFrom(unb64(ans.merged2))), want, loose)
  // A subset leaves structs pending; both merges must leave the same, and
  // the rest must complete both. Yjs cleans up formatting after each
  // transaction, so two steps may leave other format Items deleted than
  // one: each check compares like with like.
  const goSub = unb64(ans.subset)
  const restUpdates = rest.map(k => updates[k])
  // Where one update holds an Item and another a GC for the same IDs
  // (its parent deleted and collected), Yjs's merge keeps either and Go's
  // the first; left pending, a kept Item can wait for a missing parent
  // that the GC does not need. So a subset alone must give the same
  // content; its state vector and pending structs may differ.
  const goSubDoc = docFrom(goSub)
  const ySubDoc = docFrom(ySubset)
  if (state(goSubDoc) !== state(ySubDoc) && JSON.stringify(content(goSubDoc)) === JSON.stringify(content(ySubDoc))) {
    stats.checks++
    stats.pendingDiffers++
  } else {
    same(i, 'go merge of a subset', state(goSubDoc), state(ySubDoc), loose)
  }
  const subThenRest = state(docFrom(ySubset, ...restUpdates))
  same(i, 'go merge of a subset, then the rest', state(docFrom(goSub, ...restUpdates)), subThenRest, loose)
  same(i, 'go merge of the subset\'s merge (with Skips) and the rest', state(docFrom(unb64(ans.merged3))), want, loose)
  const bases = [new Uint8Array([0, 0]), mid, yMerged]
  ans.diffs.forEach((d, k) => {
    const yDiff = Y.diffUpdate(yMerged, svs[k])
    same(i, `go diff of go merge against sv ${k}`, state(docFrom(bases[k], unb64(d))), state(docFrom(bases[k], yDiff)), loose)
  })
}

// typeDoc types the size case's document: sizeInserts single-character
// edits of one Y.Text, each its own update, mostly at the end, some runs
// in the middle, about 4% deletions of 1-3 characters.
const typeDoc = () => {
  const r = prng(seed * 31 + 17)
  const doc = new Y.Doc({ guid: 'size' })
  doc.clientID = 42
  const updates = []
  doc.on('update', u => updates.push(u))
  const t = doc.getText('text')
  let pos = -1 // where a run of typing in the middle goes on, or -1
  for (let n = 0; n < sizeInserts; n++) {
    const k = r.int(100)
    if (k < 4 && t.length > 10) {
      const at = r.int(t.length - 3)
      t.delete(at, 1 + r.int(3))
      pos = -1
      continue
    }
    if (pos >= 0 && k < 70) {
      t.insert(pos++, r.pick(CHARS))
      continue
    }
    pos = k < 8 ? r.int(t.length + 1) : -1
    if (pos >= 0) t.insert(pos++, r.pick(CHARS))
    else t.insert(t.length, r.pick(CHARS))
  }
  return { doc, updates }
}

const checkSize = async () => {
  const { doc, updates } = typeDoc()
  // Y.mergeUpdates of 20,000 updates at once sorts its readers for every
  // struct: minutes. Merging in a balanced tree gives the same structs.
  const treeMerge = us => us.length <= 16 ? Y.mergeUpdates(us) : Y.mergeUpdates([treeMerge(us.slice(0, us.length >> 1)), treeMerge(us.slice(us.length >> 1))])
  const yMerged = treeMerge(updates)
  const stateUpdate = Y.encodeStateAsUpdate(doc)
  send({ kind: 'size', updates: updates.map(b64), stateBytes: stateUpdate.length, yjsMergedBytes: yMerged.length })
  const ans = await receive()
  if (ans.error) {
    fail(`size: go: ${ans.error}`)
    return
  }
  same('size', 'go merge of single-character inserts', state(docFrom(unb64(ans.merged))), state(doc))
}

// checkStore sends the typed document's updates to the Go side, which
// passes them through stores and answers, once per store, with its reply
// to a joining editor.
const checkStore = async () => {
  const { doc, updates } = typeDoc()
  const text = doc.getText('text').toString()
  const want = state(doc)
  send({ kind: 'store', updates: updates.map(b64), stateBytes: Y.encodeStateAsUpdate(doc).length, text })
  for (;;) {
    const { value: line, done } = await answers.next()
    if (done) return
    const ans = JSON.parse(line)
    const shown = failures.length
    const joined = docFrom(unb64(ans.state))
    same(ans.name, 'text a joining editor gets from the store', joined.getText('text').toString(), text)
    same(ans.name, 'document a joining editor gets from the store', state(joined), want)
    send({ kind: 'checked', failures: failures.slice(shown) })
  }
}

const main = async () => {
  if (storeMode) {
    await checkStore()
    return
  }
  // At most two requests are out at a time.
  let previous = null
  for (let i = 0; i < docCount; i++) {
    const check = checkDoc(i)
    if (previous !== null) await previous()
    previous = check
  }
  if (previous !== null) await previous()
  if (sizeInserts > 0) await checkSize()
  process.stdout.write(JSON.stringify({ kind: 'done', failed, failures, stats }) + '\n')
  rl.close()
}

main().catch(err => {
  console.error(err)
  process.exit(1)
})
