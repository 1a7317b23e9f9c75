// Real Yjs editors for the interop tests: y-websocket WebsocketProvider
// clients on Node, driven by interop_test.go through the built relay.
//
//   node clients.mjs '<spec JSON>'
//
// spec: {
//   "clients": [{ "name": "alice", "url": "ws://127.0.0.1:PORT", "doc": "notes" }, ...],
//   "edits": 5,          // insertions per client into the shared Y.Text "text"
//   "timeoutMs": 30000   // give up and report after this long
// }
//
// The clients connect one after another, each with its awareness state
// already set (as an editor does), then all edit at once. The script waits
// until every client has every edit of its document and sees the awareness
// of every other client of its document, then prints one JSON report on
// stdout and exits 0; on timeout it prints the same report and exits 1. The
// Go test makes its own assertions on the report.

import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

const spec = JSON.parse(process.argv[2])
const edits = spec.edits ?? 5
const deadline = Date.now() + (spec.timeoutMs ?? 30000)

/** token is the text a client inserts in its i-th edit. */
const token = (name, i) => `[${name}:${i}]`

/** expected lists, per document, the tokens and client names it should show. */
const expected = new Map()
for (const c of spec.clients) {
  const e = expected.get(c.doc) ?? { tokens: [], names: [] }
  for (let i = 0; i < edits; i++) e.tokens.push(token(c.name, i))
  e.names.push(c.name)
  expected.set(c.doc, e)
}

const clients = []

/** awarenessNames lists the user names a client sees, itself included. */
const awarenessNames = (c) =>
  [...c.provider.awareness.getStates().values()]
    .map((s) => s?.user?.name)
    .filter((n) => n !== undefined)
    .sort()

const report = (timedOut) => ({
  timedOut,
  clients: clients.map((c) => ({
    name: c.name,
    doc: c.doc,
    text: c.text.toString(),
    awareness: awarenessNames(c)
  }))
})

/** done reports whether every client shows all it should. */
const done = () =>
  clients.length === spec.clients.length &&
  clients.every((c) => {
    const e = expected.get(c.doc)
    const text = c.text.toString()
    const names = awarenessNames(c)
    return e.tokens.every((t) => text.includes(t)) &&
      e.names.every((n) => names.includes(n))
  })

let finished = false
const finish = (code) => {
  if (finished) return
  finished = true
  clearInterval(timer)
  process.stdout.write(JSON.stringify(report(code !== 0)) + '\n')
  for (const c of clients) c.provider.destroy()
  // Sockets close asynchronously; leave once they are gone or after a moment.
  setTimeout(() => process.exit(code), 200).unref()
}

const connect = (c) => new Promise((resolve, reject) => {
  const ydoc = new Y.Doc()
  const provider = new WebsocketProvider(c.url, c.doc, ydoc, {
    WebSocketPolyfill: WebSocket,
    // Clients in one process would otherwise sync through a
    // BroadcastChannel and bypass the relay.
    disableBc: true,
    connect: false
  })
  provider.awareness.setLocalStateField('user', { name: c.name })
  const client = { ...c, ydoc, provider, text: ydoc.getText('text') }
  provider.on('status', ({ status }) => {
    if (status === 'connected') resolve(client)
  })
  provider.on('connection-error', (e) => reject(new Error(`${c.name}: ${e.message ?? 'connection error'}`)))
  provider.connect()
})

const timer = setInterval(() => {
  if (Date.now() > deadline) finish(1)
}, 100)

for (const c of spec.clients) clients.push(await connect(c))

const check = () => {
  if (done()) finish(0)
}
for (const c of clients) {
  c.ydoc.on('update', check)
  c.provider.awareness.on('change', check)
}

// Everyone edits at once, interleaved, at either end of the text (inside
// would split another client's token).
for (let i = 0; i < edits; i++) {
  for (const c of clients) {
    const pos = Math.random() < 0.5 ? 0 : c.text.length
    c.text.insert(pos, token(c.name, i))
    await new Promise((resolve) => setImmediate(resolve))
  }
}
check()
