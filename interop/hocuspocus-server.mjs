// A real Hocuspocus server for the interop tests (PROTOCOL.md §4):
// @hocuspocus/server 3.4.4 with an onAuthenticate hook and, optionally,
// its Redis extension, documents kept in memory only (so a restart starts
// empty, as after a crash of a server without storage).
//
//   node hocuspocus-server.mjs [--port 0] [--token T] [--redis-port P] [--timeout MS]
//
// --token T: every document's auth message must carry T; any other token
//     is refused: onAuthenticate throws, and the client gets PermissionDenied
//     with the reason `token refused by hocuspocus-server`. Without it any
//     token (also the empty one) is accepted.
// --redis-port P: the Redis extension against redis on 127.0.0.1:P. Two
//     instances of this script on one Redis are one scaled-out server.
// --timeout MS: Hocuspocus's own connection timeout (default 30000). The
//     server pings every connection every MS and, at the next tick, closes
//     all documents of a connection that sent no pong since (message type 7,
//     "Connection Timeout"); the socket itself stays open.
//
// On stdout, one line per event, for the Go tests to follow. N numbers the
// WebSockets of this process from 1; DOC is the document name, JSON-quoted.
//
//   listening PORT           once it accepts connections
//   connect N                a WebSocket opened
//   disconnect N CODE        a WebSocket closed (CODE: its close code)
//   auth-ok N DOC            N authenticated DOC (Authenticated sent)
//   auth-denied N DOC        N was refused DOC (PermissionDenied sent)
//   doc-closed N DOC         the server ended N's connection to DOC (its
//                            socket closed, a timeout, a failed message, or
//                            the client's own close message)
//   loaded DOC               DOC was created in memory
//   unloaded DOC             DOC was removed from memory (no connection left)
//
// It listens on 127.0.0.1 only. Killed and started again with the old
// --port, it serves the same address with empty documents (or, with Redis,
// with whatever the other instances still hold).

import { parseArgs } from 'node:util'
import { Server } from '@hocuspocus/server'
import { Redis } from '@hocuspocus/extension-redis'

const { values: opts } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    token: { type: 'string' },
    'redis-port': { type: 'string' },
    timeout: { type: 'string', default: '30000' }
  }
})

/** refusal is the reason a client with a wrong token gets. */
export const refusal = 'token refused by hocuspocus-server'

const event = (...parts) => process.stdout.write(parts.join(' ') + '\n')
const q = (doc) => JSON.stringify(doc)

let sockets = 0
/** numbers: socketId (Hocuspocus's, per WebSocket) → N. */
const numbers = new Map()
/** requests: the upgrade request of each WebSocket → N. */
const requests = new WeakMap()

const extensions = []
if (opts['redis-port'] !== undefined) {
  extensions.push(new Redis({ host: '127.0.0.1', port: Number(opts['redis-port']) }))
}

const server = new Server({
  address: '127.0.0.1',
  port: Number(opts.port),
  timeout: Number(opts.timeout),
  quiet: true,
  stopOnSignals: false,
  extensions,
  async onConnect ({ socketId, request }) {
    numbers.set(socketId, requests.get(request))
  },
  async onAuthenticate ({ token, documentName, socketId }) {
    if (opts.token !== undefined && token !== opts.token) {
      event('auth-denied', numbers.get(socketId), q(documentName))
      // ClientConnection sends PermissionDenied with err.reason.
      throw Object.assign(new Error(refusal), { reason: refusal })
    }
    // Authenticated goes out right after the hooks: this line comes first.
    event('auth-ok', numbers.get(socketId), q(documentName))
  },
  async onDisconnect ({ socketId, documentName }) {
    event('doc-closed', numbers.get(socketId), q(documentName))
  },
  async afterLoadDocument ({ documentName }) {
    event('loaded', q(documentName))
  },
  async afterUnloadDocument ({ documentName }) {
    event('unloaded', q(documentName))
  }
})

// Runs right after Hocuspocus's own handler, in the same tick: before any
// message of the socket, so connect is printed before its documents.
server.webSocketServer.on('connection', (ws, request) => {
  const n = ++sockets
  requests.set(request, n)
  event('connect', n)
  ws.on('close', (code) => event('disconnect', n, code))
})

// Server.listen would pass the address as `address`, which Node's
// ListenOptions ignore (it wants `host`), and listen on every interface;
// this listens on loopback only. (listen's own extras are signal handlers,
// turned off here, and onListen hooks, which no extension here has.)
server.httpServer.listen(Number(opts.port), '127.0.0.1', () => {
  event('listening', server.httpServer.address().port)
})
