// Real Yjs editors for the interop tests: y-websocket WebsocketProvider
// clients on Node, driven by the Go tests through the built relay, and
// HocuspocusProvider clients straight on a Hocuspocus server.
//
//   node editors.mjs
//
// It reads one JSON command per line on stdin and answers each with one
// JSON line on stdout ({"ok": true, ...} or {"ok": false, "error": ...}).
// Commands:
//
//   {"cmd":"join","name":"alice","url":"ws://127.0.0.1:PORT","doc":"notes","offline":2,"timeoutMs":10000,"maxBackoffMs":2500}
//       a new editor with awareness {user:{name}}; answers once connected.
//       offline (default 0): tokens it makes before it connects, as an
//       editor that opens a document it stored while offline.
//       maxBackoffMs: the provider's longest wait between reconnection
//       attempts (y-websocket's maxBackoffTime, default 2500)
//   {"cmd":"join","name":"hank","url":"ws://127.0.0.1:PORT","doc":"notes","hocuspocus":true,"token":"secret"}
//       the same with a HocuspocusProvider (@hocuspocus/provider), for an
//       editor straight on a Hocuspocus server: it sends token (default
//       "") with the document's auth message, and answers once the server
//       authenticated it and the first sync is done (an error at once if
//       the server refuses the token). Every other command works for it as
//       for a y-websocket editor.
//   {"cmd":"edit","rounds":3,"names":["alice"]}
//       every editor (or those named) inserts rounds tokens "[name:i]"
//       into the Y.Text "text"
//   {"cmd":"insert","name":"alice","bytes":300000}
//       alice makes one token followed by bytes filler characters, in one
//       update
//   {"cmd":"disconnect","name":"alice"}   closes alice's provider's socket;
//       she keeps editing locally when told to
//   {"cmd":"connect","name":"alice"}      connects it again; answers once
//       connected
//   {"cmd":"leave","name":"alice"}   destroys alice's provider and document
//       (her socket closes) and forgets her: she is in no later report or
//       convergence, and her name may join again
//   {"cmd":"startEditing","intervalMs":20}   every editor inserts a token
//   {"cmd":"stopEditing"}                    every interval, until stopped
//   {"cmd":"waitEdits","count":10}  waits until every editor made count more
//   {"cmd":"converge","timeoutMs":20000,"expect":{"notes":["[x:0]"]}}
//       waits until every editor has every token made so far on its
//       document, and those in expect (made by editors elsewhere);
//       answers with the report (ok false on timeout)
//   {"cmd":"awareness","name":"bob","of":"carol","present":false,"timeoutMs":20000}
//       waits until bob sees carol's awareness (or no longer sees it);
//       answers with the milliseconds it took
//   {"cmd":"report"}
//   {"cmd":"quit"}
//
// A report lists per editor: name, doc, text, tokens made, awareness names.
// The Go tests make their own assertions on it.

import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import { HocuspocusProvider } from '@hocuspocus/provider'
import WebSocket from 'ws'
import { serveCommands } from './commands.mjs'

// Every WebsocketProvider adds a process 'exit' listener: more than ten
// editors in one process are expected here, not a leak.
process.setMaxListeners(0)

/** editors by name, in join order. */
const editors = new Map()

const token = (name, i) => `[${name}:${i}]`

const awarenessNames = (e) =>
  [...e.provider.awareness.getStates().values()]
    .map((s) => s?.user?.name)
    .filter((n) => n !== undefined)
    .sort()

const report = () => [...editors.values()].map((e) => ({
  name: e.name,
  doc: e.doc,
  text: e.text.toString(),
  made: e.made,
  awareness: awarenessNames(e)
}))

/** waitFor resolves when check() holds, re-checking on every document or
 * awareness change, or rejects after timeoutMs. */
const waitFor = (check, timeoutMs) => new Promise((resolve, reject) => {
  const started = Date.now()
  const subs = []
  const done = (err) => {
    clearTimeout(timer)
    for (const [target, event, fn] of subs) target.off(event, fn)
    err ? reject(err) : resolve(Date.now() - started)
  }
  const recheck = () => { if (check()) done() }
  const timer = setTimeout(() => done(new Error(`timed out after ${timeoutMs} ms`)), timeoutMs)
  for (const e of editors.values()) {
    subs.push([e.ydoc, 'update', recheck], [e.provider.awareness, 'change', recheck])
  }
  for (const [target, event, fn] of subs) target.on(event, fn)
  recheck()
})

/** joinHocuspocus is join with a HocuspocusProvider: one socket per
 * editor, carrying its one document. */
const joinHocuspocus = ({ name, url, doc, offline, timeoutMs, maxBackoffMs, token }) => new Promise((resolve, reject) => {
  const ydoc = new Y.Doc()
  const e = { name, doc, ydoc, text: ydoc.getText('text'), made: [] }
  for (let i = 0; i < (offline ?? 0); i++) editOne(e)
  const maxDelay = maxBackoffMs ?? 2500
  const provider = new HocuspocusProvider({
    url,
    name: doc,
    document: ydoc,
    token: token ?? '',
    WebSocketPolyfill: WebSocket,
    // Reconnect as quickly as the y-websocket editors do.
    delay: Math.min(100, maxDelay),
    minDelay: Math.min(100, maxDelay),
    maxDelay
  })
  provider.awareness.setLocalStateField('user', { name })
  e.provider = provider
  const fail = (err) => {
    clearTimeout(timer)
    provider.destroy()
    reject(err)
  }
  const timer = setTimeout(() => fail(new Error(`${name}: not synced after ${timeoutMs ?? 10000} ms`)), timeoutMs ?? 10000)
  provider.on('authenticationFailed', ({ reason }) => {
    if (!editors.has(name)) fail(new Error(`${name}: authentication failed: ${reason}`))
  })
  provider.on('synced', () => {
    if (!editors.has(name)) {
      clearTimeout(timer)
      editors.set(name, e)
      resolve({})
    }
  })
})

const join = (cmd) => cmd.hocuspocus ? joinHocuspocus(cmd) : joinWebsocket(cmd)

const joinWebsocket = ({ name, url, doc, offline, timeoutMs, maxBackoffMs }) => new Promise((resolve, reject) => {
  const ydoc = new Y.Doc()
  const e = { name, doc, ydoc, text: ydoc.getText('text'), made: [] }
  for (let i = 0; i < (offline ?? 0); i++) editOne(e)
  const provider = new WebsocketProvider(url, doc, ydoc, {
    WebSocketPolyfill: WebSocket,
    // Editors in one process would otherwise sync through a
    // BroadcastChannel and bypass the relay.
    disableBc: true,
    connect: false,
    maxBackoffTime: maxBackoffMs ?? 2500
  })
  provider.awareness.setLocalStateField('user', { name })
  e.provider = provider
  const timer = setTimeout(() => {
    provider.destroy()
    reject(new Error(`${name}: not connected after ${timeoutMs ?? 10000} ms`))
  }, timeoutMs ?? 10000)
  provider.on('status', ({ status }) => {
    if (status === 'connected' && !editors.has(name)) {
      clearTimeout(timer)
      editors.set(name, e)
      resolve({})
    }
  })
  provider.connect()
})

/** editOne makes one token of editor e, at either end of the text (inside
 * would split another editor's token), followed by filler characters. */
const editOne = (e, filler = '') => {
  const t = token(e.name, e.made.length)
  e.text.insert(Math.random() < 0.5 ? 0 : e.text.length, t + filler)
  e.made.push(t)
}

/** edit makes one token per editor, or per editor named in names. */
const edit = (names) => {
  for (const e of editors.values()) {
    if (!names || names.includes(e.name)) editOne(e)
  }
}

/** editor returns the editor called name, or throws. */
const editor = (name) => {
  const e = editors.get(name)
  if (!e) throw new Error(`no editor ${name}`)
  return e
}

let editing = null

/** converged reports whether every editor has every token made on its
 * document, here or (expect: doc → tokens) elsewhere. */
const converged = (expect) => {
  const want = new Map(Object.entries(expect ?? {}))
  for (const e of editors.values()) {
    want.set(e.doc, (want.get(e.doc) ?? []).concat(e.made))
  }
  return [...editors.values()].every((e) => {
    const text = e.text.toString()
    return want.get(e.doc).every((t) => text.includes(t))
  })
}

const commands = {
  join,
  edit: async ({ rounds, names }) => {
    for (let i = 0; i < rounds; i++) {
      edit(names)
      await new Promise((resolve) => setImmediate(resolve))
    }
    return {}
  },
  insert: async ({ name, bytes }) => {
    editOne(editor(name), 'x'.repeat(bytes))
    return {}
  },
  disconnect: async ({ name }) => {
    editor(name).provider.disconnect()
    return {}
  },
  connect: async ({ name, timeoutMs }) => {
    const { provider } = editor(name)
    const connected = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        provider.off('status', onStatus)
        reject(new Error(`${name}: not connected after ${timeoutMs ?? 10000} ms`))
      }, timeoutMs ?? 10000)
      const onStatus = ({ status }) => {
        if (status !== 'connected') return
        clearTimeout(timer)
        provider.off('status', onStatus)
        resolve({})
      }
      provider.on('status', onStatus)
    })
    provider.connect()
    return connected
  },
  leave: async ({ name }) => {
    const e = editor(name)
    e.provider.destroy()
    e.ydoc.destroy()
    editors.delete(name)
    return {}
  },
  startEditing: async ({ intervalMs }) => {
    editing = setInterval(() => edit(), intervalMs ?? 20)
    return {}
  },
  waitEdits: async ({ count, timeoutMs }) => {
    const start = new Map([...editors.values()].map((e) => [e.name, e.made.length]))
    const deadline = Date.now() + (timeoutMs ?? 20000)
    while ([...editors.values()].some((e) => e.made.length < start.get(e.name) + count)) {
      if (Date.now() > deadline) throw new Error(`fewer than ${count} edits in ${timeoutMs} ms`)
      await new Promise((resolve) => setTimeout(resolve, 10))
    }
    return {}
  },
  stopEditing: async () => {
    clearInterval(editing)
    editing = null
    return {}
  },
  converge: async ({ timeoutMs, expect }) => {
    try {
      const ms = await waitFor(() => converged(expect), timeoutMs ?? 20000)
      return { ms, report: report() }
    } catch (err) {
      return { ok: false, error: err.message, report: report() }
    }
  },
  awareness: async ({ name, of, present, timeoutMs }) => {
    const e = editor(name)
    const ms = await waitFor(() => awarenessNames(e).includes(of) === present, timeoutMs ?? 20000)
    return { ms }
  },
  report: async () => ({ report: report() }),
  quit: async () => {
    clearInterval(editing)
    for (const e of editors.values()) e.provider.destroy()
    setTimeout(() => process.exit(0), 100)
    return {}
  }
}

// Commands run one at a time, in order; the end of input quits.
serveCommands(commands)
