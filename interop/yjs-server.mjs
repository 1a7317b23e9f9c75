// The y-websocket reference server for the interop tests (PROTOCOL.md §3):
// @y/websocket-server's own setupWSConnection behind a plain HTTP server,
// one WebSocket per document at /<room>, documents kept in memory only (so
// a restart starts empty, as after a crash of a server without storage).
//
//   node yjs-server.mjs [--port 0] [--refuse-regex RE]
//
// --refuse-regex RE: an upgrade whose raw request target without the
//     leading "/" (query string included: ELVA checks the raw path) does
//     not match RE is answered with HTTP 403 and a body naming the reason,
//     as ELVA servers do with ^[A-Za-z0-9_-]{1,250}$.
//
// On stdout, one line per event, for the Go tests to follow:
//
//   listening PORT               once it accepts connections
//   open ROOM N TOTAL            a WebSocket joined ROOM
//   closed ROOM N TOTAL          a WebSocket of ROOM closed
//   refused ROOM                 an upgrade answered with 403
//
// ROOM is the room name as @y/websocket-server derives it (the raw path
// without "/" and without the query, not percent-decoded), JSON-quoted; N
// is the number of open WebSockets of that room after the event, TOTAL
// that of every room. GET /stats answers {"rooms":{ROOM:N},"total":TOTAL}.
//
// It listens on 127.0.0.1 only. Killed and started again with the old
// --port, it serves the same address with empty documents.

import http from 'node:http'
import { parseArgs } from 'node:util'
import { WebSocketServer } from 'ws'
import { setupWSConnection } from '@y/websocket-server/utils'

const { values: opts } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    'refuse-regex': { type: 'string' }
  }
})
const refuse = opts['refuse-regex'] === undefined ? null : new RegExp(opts['refuse-regex'])

/** open: room → number of open WebSockets. */
const open = new Map()
let total = 0

/** roomOf is setupWSConnection's default docName for a request. */
const roomOf = (req) => (req.url || '').slice(1).split('?')[0]

const event = (kind, room) => {
  process.stdout.write(`${kind} ${JSON.stringify(room)} ${open.get(room) ?? 0} ${total}\n`)
}

const stats = () => JSON.stringify({ rooms: Object.fromEntries(open), total })

const wss = new WebSocketServer({ noServer: true })
wss.on('connection', (conn, req) => {
  const room = roomOf(req)
  open.set(room, (open.get(room) ?? 0) + 1)
  total++
  event('open', room)
  conn.on('close', () => {
    const n = open.get(room) - 1
    n === 0 ? open.delete(room) : open.set(room, n)
    total--
    event('closed', room)
  })
  // An error of the socket (a reset, a bad frame) closes it; without a
  // listener it would end the server.
  conn.on('error', (err) => console.error(`yjs-server: ${room}: ${err.message}`))
  setupWSConnection(conn, req)
})

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/stats') {
    res.writeHead(200, { 'content-type': 'application/json' }).end(stats() + '\n')
    return
  }
  res.writeHead(426).end('WebSocket only\n')
})
server.on('upgrade', (req, socket, head) => {
  const target = (req.url || '').slice(1)
  if (refuse !== null && !refuse.test(target)) {
    const body = `invalid identifier ${JSON.stringify(target)}: does not match ${refuse.source}\n`
    socket.end('HTTP/1.1 403 Forbidden\r\n' +
      'content-type: text/plain; charset=utf-8\r\n' +
      `content-length: ${Buffer.byteLength(body)}\r\n` +
      'connection: close\r\n\r\n' + body)
    process.stdout.write(`refused ${JSON.stringify(roomOf(req))}\n`)
    return
  }
  wss.handleUpgrade(req, socket, head, (conn) => wss.emit('connection', conn, req))
})
server.listen(Number(opts.port), '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`)
})
