// An ELVA-protocol server for the interop tests (PROTOCOL.md §2): one
// WebSocket per relay on the root path, every frame an ID message
// (magic, varuint length, UTF-8 name) followed by a plain Yjs message.
//
//   node elva-server.mjs --port 0 --mode broadcast|persistent [--magic 0200] [--store DIR]
//                        [--max-payload BYTES]
//
// broadcast:  each frame goes, prefix and all, to the other connections in
//             the document's room.
// persistent: the server keeps a Y.Doc per document (in DIR, if given, so
//             that it survives a restart): it answers step 1 with step 2
//             and its own step 1 (to the sender only), applies step 2 and
//             updates and broadcasts the changes as updates to the others.
//             Awareness is broadcast as it is.
//
// --max-payload is the largest frame the server takes (the ws library's
// maxPayload, default 100 MiB); a larger one closes that connection with
// 1009 (message too big), as real servers with a message limit do.
//
// GET /text?doc=NAME answers {"text": ...}: the Y.Text "text" of the
// document as the server keeps it (persistent mode only; 404 otherwise),
// so that a test can see what the server has without a client of its own.
//
// It prints "listening PORT" on stdout once it accepts connections, and
// listens on 127.0.0.1 only.

import http from 'node:http'
import fs from 'node:fs'
import path from 'node:path'
import { parseArgs } from 'node:util'
import { WebSocketServer } from 'ws'
import * as Y from 'yjs'
import * as syncProtocol from 'y-protocols/sync'
import * as encoding from 'lib0/encoding'
import * as decoding from 'lib0/decoding'

const { values: opts } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    mode: { type: 'string', default: 'broadcast' },
    magic: { type: 'string', default: '0200' },
    store: { type: 'string' },
    'max-payload': { type: 'string', default: String(100 * 1024 * 1024) }
  }
})
const magic = Buffer.from(opts.magic, 'hex')
const persistent = opts.mode === 'persistent'

/** rooms: name → { conns: Set<WebSocket>, doc?: Y.Doc } */
const rooms = new Map()

const prefix = (name) => {
  const id = Buffer.from(name, 'utf8')
  const encoder = encoding.createEncoder()
  encoding.writeUint8Array(encoder, magic)
  encoding.writeVarUint(encoder, id.length)
  encoding.writeUint8Array(encoder, id)
  return encoding.toUint8Array(encoder)
}

const send = (conn, name, msg) => {
  if (conn.readyState === conn.OPEN) conn.send(Buffer.concat([prefix(name), msg]))
}

const storePath = (name) => path.join(opts.store, Buffer.from(name, 'utf8').toString('hex') + '.ydoc')

const room = (name) => {
  let r = rooms.get(name)
  if (r) return r
  r = { conns: new Set() }
  if (persistent) {
    r.doc = new Y.Doc()
    if (opts.store && fs.existsSync(storePath(name))) {
      Y.applyUpdate(r.doc, fs.readFileSync(storePath(name)))
    }
    r.doc.on('update', (update, origin) => {
      if (opts.store) {
        // Write and rename, so that a kill never leaves half a file.
        fs.writeFileSync(storePath(name) + '.tmp', Y.encodeStateAsUpdate(r.doc))
        fs.renameSync(storePath(name) + '.tmp', storePath(name))
      }
      const encoder = encoding.createEncoder()
      encoding.writeVarUint(encoder, 0)
      syncProtocol.writeUpdate(encoder, update)
      const msg = encoding.toUint8Array(encoder)
      for (const c of r.conns) if (c !== origin) send(c, name, msg)
    })
  }
  rooms.set(name, r)
  return r
}

/** splitFrame decodes the ID prefix; it throws on a malformed frame. */
const splitFrame = (data) => {
  if (data[0] !== magic[0] || data[1] !== magic[1]) throw new Error('no ID prefix')
  const decoder = decoding.createDecoder(data.subarray(2))
  const len = decoding.readVarUint(decoder)
  const start = 2 + decoder.pos
  const name = data.subarray(start, start + len).toString('utf8')
  return { name, msg: data.subarray(start + len) }
}

const handlePersistent = (conn, name, r, msg) => {
  const decoder = decoding.createDecoder(msg)
  const type = decoding.readVarUint(decoder)
  if (type === 1) {
    for (const c of r.conns) if (c !== conn) send(c, name, msg)
    return
  }
  if (type !== 0) return
  const encoder = encoding.createEncoder()
  encoding.writeVarUint(encoder, 0)
  const sub = syncProtocol.readSyncMessage(decoder, encoder, r.doc, conn)
  if (encoding.length(encoder) > 1) send(conn, name, encoding.toUint8Array(encoder))
  if (sub === syncProtocol.messageYjsSyncStep1) {
    const step1 = encoding.createEncoder()
    encoding.writeVarUint(step1, 0)
    syncProtocol.writeSyncStep1(step1, r.doc)
    send(conn, name, encoding.toUint8Array(step1))
  }
}

const wss = new WebSocketServer({ noServer: true, maxPayload: Number(opts['max-payload']) })
wss.on('connection', (conn) => {
  const joined = new Set()
  conn.on('message', (data) => {
    let frame
    try {
      frame = splitFrame(data)
    } catch (err) {
      console.error(`dropped frame: ${err.message}`)
      return
    }
    const r = room(frame.name)
    r.conns.add(conn)
    joined.add(frame.name)
    if (!persistent) {
      for (const c of r.conns) if (c !== conn) send(c, frame.name, frame.msg)
      return
    }
    try {
      handlePersistent(conn, frame.name, r, frame.msg)
    } catch (err) {
      console.error(`elva-server: ${frame.name}: ${err.stack}`)
    }
  })
  // A frame over --max-payload is an error of the connection, which ws
  // then closes with 1009; without a listener the error would end the server.
  conn.on('error', (err) => console.error(`elva-server: connection closed: ${err.message}`))
  conn.on('close', () => {
    for (const name of joined) rooms.get(name)?.conns.delete(conn)
  })
})

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1')
  if (url.pathname !== '/text') {
    res.writeHead(426).end('WebSocket only\n')
  } else if (!persistent) {
    res.writeHead(404).end('broadcast mode keeps no documents\n')
  } else {
    const text = room(url.searchParams.get('doc') ?? '').doc.getText('text').toString()
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ text }) + '\n')
  }
})
server.on('upgrade', (req, socket, head) => {
  if (req.url !== '/') {
    socket.end('HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n')
    return
  }
  wss.handleUpgrade(req, socket, head, (conn) => wss.emit('connection', conn, req))
})
server.listen(Number(opts.port), '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`)
})
