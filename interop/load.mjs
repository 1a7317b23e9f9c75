// The side-by-side load command (issue 12): it builds the relay, starts
// every server itself on 127.0.0.1, runs the same workloads against each
// and prints one table, with every figure also as a ratio to rawrelay's.
//
//   node interop/load.mjs [--short] [--workloads a,b,c,d,e,f]
//                         [--servers elva,elva-store,rawrelay,yjs] [--json]
//                         [--append] [--relay-bin PATH] [--help]
//
// from the repository root (or `node load.mjs` in interop/), after
// `npm ci` in interop/. Servers:
//
//   elva        the built binary with --no-store, its upstream attached to
//               an ELVA-protocol sink (elva-server.mjs --mode broadcast),
//               so that every message is also written upstream
//   elva-store  the same with the store on, in a temporary --data-dir
//   elva-local  the built binary with --no-store and no server at all
//               (not in the default list): what the upstream costs
//   rawrelay    ../shared/bench/rawrelay (one mutex, no hub, no upstream),
//               built when that directory exists; otherwise its column is
//               left out with a note, and there are no ratios
//   yjs         @y/websocket-server's own server.js: it applies every
//               update to a Y.Doc, so the updates sent are real ones
//
// Workloads (--short: the counts in brackets):
//
//   a  10 documents × 1 writer × 5 readers [1 document], 200-byte strings
//      inserted at the start of a Y.Text (--append: at its end; see
//      buildMessages), one update each, 3,000 [200] per writer, as fast
//      as a window of 64 messages in flight per writer allows (a message
//      leaves the window once every reader has it)
//   b  the same paced at 200 messages/s per writer, 5 s [0.5 s] (latency)
//   c  one document, 1 writer, 50 readers, 2,000 [200] messages
//   d  64 KiB strings, 100 [20] per writer, window 8
//   e  10,000 idle connections over 1,000 documents [200 over 20]: RSS
//      per connection, errors, CPU while they idle
//   f  a laptop at rest: 5 y-websocket editors (awareness on) on 2
//      documents, nothing typed, 60 s [3 s]; every server at once
//
// Every server and workload gets a fresh server process, so that memory
// figures start from the same state. A server's CPU time is utime+stime
// from /proc/PID/stat; the load generator (this one Node process) and the
// ELVA sink share the machine's cores with it, so servers are compared by
// deliveries per server CPU-second, and by latency on the paced run.
//
// --relay-bin PATH runs that elva-service binary instead of building one
// (another version, or one built with profiling).
//
// With --json, stdout is one JSON object (the table included) and the
// progress goes to stderr. The exit status is 1 when any server or
// workload failed (its cells say why), 0 otherwise.

import { spawn, spawnSync } from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import readline from 'node:readline'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { performance } from 'node:perf_hooks'
import WebSocket from 'ws'
import * as Y from 'yjs'
import * as syncProtocol from 'y-protocols/sync'
import * as encoding from 'lib0/encoding'
import { WebsocketProvider } from 'y-websocket'

// Every WebsocketProvider adds a process 'exit' listener.
process.setMaxListeners(0)

const here = path.dirname(fileURLToPath(import.meta.url))
const root = path.resolve(here, '..')
const rawrelayDir = path.resolve(root, '..', 'shared', 'bench', 'rawrelay')
const yjsServerScript = path.join(here, 'node_modules', '@y', 'websocket-server', 'src', 'server.js')

// wantNoFile is the open-file limit asked for, for this process and every
// server: workload e holds 10,000 sockets on each side.
const wantNoFile = 65536
// ulimitSh raises the open-file limit as far as it may go and runs "$0".
const ulimitSh = `ulimit -n ${wantNoFile} 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$0" "$@"`

// startTimeout bounds a server's start; stopTimeout its stop after
// SIGTERM, after which it is killed.
const startTimeout = 15000
const stopTimeout = 8000
// stallTimeout ends a run in which no message arrived for that long.
const stallTimeout = 10000
// mark starts every inserted string, followed by 8 digits: the message's
// number. Readers find it in any encoding of the update, so servers that
// re-encode updates (@y/websocket-server) are measured like the others.
const mark = 'ELVALOAD'
const markBytes = Buffer.from(mark)

const { values: opts } = parseArgs({
  options: {
    short: { type: 'boolean', default: false },
    workloads: { type: 'string', default: 'a,b,c,d,e,f' },
    servers: { type: 'string', default: 'elva,elva-store,rawrelay,yjs' },
    append: { type: 'boolean', default: false },
    'relay-bin': { type: 'string' },
    json: { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false }
  }
})

if (opts.help) {
  // The usage is this file's opening comment.
  const header = fs.readFileSync(fileURLToPath(import.meta.url), 'utf8').split('\n\nimport ')[0]
  console.log(header.replace(/^\/\/ ?/gm, ''))
  process.exit(0)
}

const short = opts.short
const t00 = performance.now()
const log = (...args) => console.error(`load ${((performance.now() - t00) / 1000).toFixed(1).padStart(5)}s:`, ...args)

// --- processes -------------------------------------------------------

/** procs are the processes this command started and has not seen exit. */
const procs = new Set()
// stopping is set by the first signal: nothing starts after it.
let stopping = false

/** tmp holds the binaries and data directories; removed at the end. */
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'elva-load-'))

/** startProc runs file with args under the raised open-file limit
 * (exec keeps the PID: pid is the program's own). It keeps the last lines
 * of its output for error messages and lets waitLine look for one. */
const startProc = (name, file, args, { env, cwd } = {}) => {
  if (stopping) throw new Error(`stopping: ${name} not started`)
  const child = spawn('sh', ['-c', ulimitSh, file, ...args], {
    cwd: cwd ?? root,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  const p = { name, child, pid: child.pid, tail: [], watchers: new Set(), status: null }
  procs.add(p)
  p.exited = new Promise((resolve) => child.on('exit', (code, signal) => {
    p.status = signal ?? code
    procs.delete(p)
    for (const w of p.watchers) w.exit()
    resolve()
  }))
  child.on('error', (err) => p.tail.push(`spawn: ${err.message}`))
  for (const stream of [child.stdout, child.stderr]) {
    readline.createInterface({ input: stream }).on('line', (line) => {
      p.tail.push(line)
      if (p.tail.length > 30) p.tail.shift()
      for (const w of p.watchers) w.line(line)
    })
  }
  return p
}

const tailOf = (p) => p.tail.length ? '\n    ' + p.tail.slice(-12).join('\n    ') : ' (no output)'

/** waitLine resolves with the match of the first line of p matching re,
 * among the lines kept already (readline hands over every line of a chunk
 * before an await returns) or to come; it rejects when p exits first or
 * after timeoutMs. */
const waitLine = (p, re, what, timeoutMs = startTimeout) => new Promise((resolve, reject) => {
  for (const line of p.tail) {
    const m = re.exec(line)
    if (m) return resolve(m)
  }
  const w = {
    line: (line) => { const m = re.exec(line); if (m) done(null, m) },
    exit: () => done(new Error(`${p.name} exited (${p.status}) before ${what}:${tailOf(p)}`))
  }
  const timer = setTimeout(() => done(new Error(`${p.name}: no ${what} after ${timeoutMs} ms:${tailOf(p)}`)), timeoutMs)
  const done = (err, m) => {
    clearTimeout(timer)
    p.watchers.delete(w)
    err ? reject(err) : resolve(m)
  }
  p.watchers.add(w)
  if (p.status !== null) w.exit()
})

/** stopProc ends p with SIGTERM, and with SIGKILL after stopTimeout; it
 * reports whether p stopped by itself. */
const stopProc = async (p) => {
  if (p.status !== null) return true
  p.child.kill('SIGTERM')
  if (await within(p.exited, stopTimeout)) return true
  p.child.kill('SIGKILL')
  await within(p.exited, 2000)
  return false
}

/** within resolves true when promise settles within ms, false otherwise. */
const within = (promise, ms) => {
  let timer
  return Promise.race([
    promise.then(() => true, () => true),
    new Promise((resolve) => { timer = setTimeout(() => resolve(false), ms) })
  ]).finally(() => clearTimeout(timer))
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** freePort asks the OS for a free port on 127.0.0.1. */
const freePort = () => new Promise((resolve, reject) => {
  const srv = net.createServer()
  srv.on('error', reject)
  srv.listen(0, '127.0.0.1', () => {
    const { port } = srv.address()
    srv.close(() => resolve(port))
  })
})

/** waitTCP resolves once 127.0.0.1:port accepts a connection. */
const waitTCP = async (p, port) => {
  const deadline = Date.now() + startTimeout
  while (Date.now() < deadline) {
    if (p.status !== null) throw new Error(`${p.name} exited (${p.status}) before listening:${tailOf(p)}`)
    const ok = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1')
      s.on('connect', () => { s.destroy(); resolve(true) })
      s.on('error', () => resolve(false))
    })
    if (ok) return
    await sleep(5)
  }
  throw new Error(`${p.name} not listening on ${port} after ${startTimeout} ms:${tailOf(p)}`)
}

// --- /proc -----------------------------------------------------------

const clkTck = (() => {
  const r = spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' })
  const n = Number(r.stdout?.trim())
  return n > 0 ? n : 100
})()

/** cpuTicks is utime+stime of pid, every thread, in clock ticks. */
const cpuTicks = (pid) => {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8')
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return Number(fields[11]) + Number(fields[12]) // fields 14 and 15 of proc(5)
}

/** rssKiB is VmRSS of pid. */
const rssKiB = (pid) => {
  const m = /^VmRSS:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))
  return m ? Number(m[1]) : NaN
}

/** noFileLimit is the soft and hard open-file limits of pid ('self'). */
const noFileLimit = (pid = 'self') => {
  const m = /^Max open files\s+(\S+)\s+(\S+)/m.exec(fs.readFileSync(`/proc/${pid}/limits`, 'utf8'))
  const num = (s) => s === 'unlimited' ? Infinity : Number(s)
  return m ? { soft: num(m[1]), hard: num(m[2]) } : { soft: NaN, hard: NaN }
}

// --- the open-file limit of this process -----------------------------

// Node cannot raise its own limit: below what workload e needs, run this
// command again under sh's ulimit, once.
{
  const { soft, hard } = noFileLimit()
  if (soft < Math.min(wantNoFile, hard) && !process.env.ELVA_LOAD_NOFILE) {
    fs.rmSync(tmp, { recursive: true, force: true })
    const child = spawn('sh', ['-c', ulimitSh, process.execPath, ...process.execArgv, fileURLToPath(import.meta.url), ...process.argv.slice(2)], {
      stdio: 'inherit',
      env: { ...process.env, ELVA_LOAD_NOFILE: '1' }
    })
    // A Ctrl-C reaches the child through the process group; a signal to
    // this process alone is passed on.
    process.on('SIGINT', () => {})
    process.on('SIGTERM', () => child.kill('SIGTERM'))
    child.on('exit', (code, signal) => process.exit(code ?? 128 + (os.constants.signals[signal] ?? 0)))
    await new Promise(() => {})
  }
}

// --- cleanup ---------------------------------------------------------

/** cleanup stops every process still running and removes tmp. */
const cleanup = async () => {
  await Promise.all([...procs].map(stopProc))
  fs.rmSync(tmp, { recursive: true, force: true })
}

for (const [signal, code] of [['SIGINT', 130], ['SIGTERM', 143], ['SIGHUP', 129]]) {
  process.on(signal, () => {
    if (stopping) return
    stopping = true
    log(`${signal}: stopping the servers`)
    cleanup().finally(() => process.exit(code))
  })
}
// The last resort, should anything exit without cleanup.
process.on('exit', () => {
  for (const p of procs) p.child.kill('SIGKILL')
  fs.rmSync(tmp, { recursive: true, force: true })
})

// --- messages --------------------------------------------------------

/** buildMessages makes count y-websocket sync messages, each one update of
 * one Y.Doc that inserts a string of size bytes at the start of the Y.Text
 * "text" (--append: at its end): mark, the message's number in 8 digits,
 * filler. Every writer sends the same messages, each to its own document.
 *
 * At the start, because a server that applies updates (@y/websocket-server)
 * then pays per message, whatever the run's length: appended strings of one
 * client merge into one item that grows with the document, and Yjs's
 * 'update' event, which that server re-encodes and sends, then costs about
 * 1 ms per 200-byte update at 600 KB (19 µs at the start). */
const buildMessages = (count, size) => {
  const doc = new Y.Doc()
  const text = doc.getText('text')
  let update = null
  doc.on('update', (u) => { update = u })
  const filler = 'x'.repeat(size - mark.length - 8)
  const msgs = new Array(count)
  for (let i = 0; i < count; i++) {
    text.insert(opts.append ? text.length : 0, mark + String(i).padStart(8, '0') + filler)
    const enc = encoding.createEncoder()
    encoding.writeVarUint(enc, 0) // messageSync
    syncProtocol.writeUpdate(enc, update)
    msgs[i] = Buffer.from(encoding.toUint8Array(enc))
  }
  doc.destroy()
  return msgs
}

/** seqOf is the number of the message in data, or -1: not one of ours. */
const seqOf = (data) => {
  const at = data.indexOf(markBytes)
  if (at < 0 || at + 16 > data.length) return -1
  let n = 0
  for (let k = at + 8; k < at + 16; k++) {
    const d = data[k] - 48
    if (d < 0 || d > 9) return -1
    n = n * 10 + d
  }
  return n
}

// --- servers ---------------------------------------------------------

const serverInfo = {
  elva: { title: 'elva-service (--no-store, upstream)' },
  'elva-store': { title: 'elva-service (store, upstream)' },
  'elva-local': { title: 'elva-service (--no-store, no upstream)' },
  rawrelay: { title: 'rawrelay' },
  yjs: { title: '@y/websocket-server' }
}

const bins = {}

/** build compiles the relay, and rawrelay when its directory exists. */
const build = (notes) => {
  const go = (dir, out) => spawnSync('go', ['build', '-o', out, '.'], {
    cwd: dir,
    env: { ...process.env, CGO_ENABLED: '0' },
    encoding: 'utf8',
    timeout: 300000
  })
  if (opts['relay-bin']) {
    bins.elva = path.resolve(opts['relay-bin'])
    if (!fs.existsSync(bins.elva)) throw new Error(`--relay-bin ${bins.elva}: no such file`)
    notes.push(`elva-service: ${bins.elva} (--relay-bin), not built from this tree`)
  } else {
    bins.elva = path.join(tmp, 'elva-service')
    log('go build -o', bins.elva, '.')
    const r = go(root, bins.elva)
    if (r.error) throw new Error(`go build: ${r.error.message} (is Go installed?)`)
    if (r.status !== 0) throw new Error(`go build failed:\n${r.stderr}`)
  }
  if (!fs.existsSync(rawrelayDir)) {
    notes.push(`rawrelay unavailable: ${rawrelayDir} does not exist (a clone without ../shared), so its column and the ratios are left out`)
    return
  }
  bins.rawrelay = path.join(tmp, 'rawrelay')
  log('go build -o', bins.rawrelay, 'in', rawrelayDir)
  const rr = go(rawrelayDir, bins.rawrelay)
  if (rr.error || rr.status !== 0) {
    notes.push(`rawrelay unavailable: go build in ${rawrelayDir} failed: ${(rr.error?.message ?? rr.stderr).trim().split('\n').pop()}`)
    delete bins.rawrelay
  }
}

let dataDirs = 0

/** startServer starts one server (and the ELVA sink for elva-service) and
 * resolves with { pid, url, stop }, url ending in "/". */
const startServer = async (kind, { manyConns = false } = {}) => {
  const started = []
  const stop = async () => {
    const clean = await Promise.all(started.reverse().map(stopProc))
    return clean.every(Boolean)
  }
  try {
    if (kind === 'elva' || kind === 'elva-store') {
      const sink = startProc('elva-server.mjs', process.execPath, [path.join(here, 'elva-server.mjs'), '--port', '0', '--mode', 'broadcast'], { cwd: here })
      started.push(sink)
      const [, sinkPort] = await waitLine(sink, /^listening (\d+)$/, 'listening line')
      const args = ['--server', `ws://127.0.0.1:${sinkPort}/`]
      args.push(...(kind === 'elva' ? ['--no-store'] : ['--data-dir', path.join(tmp, `data-${++dataDirs}`)]))
      if (manyConns) args.push('--max-connections', '20000', '--max-per-document', '1000')
      const relay = startProc(kind, bins.elva, [...args, '127.0.0.1', '0'])
      started.push(relay)
      const [, addr] = await waitLine(relay, /msg=listening addr=(\S+)/, 'listening line')
      await waitLine(relay, /msg="upstream connected"/, 'upstream connection')
      return { pid: relay.pid, sinkPid: sink.pid, url: `ws://${addr}/`, stop, proc: relay }
    }
    if (kind === 'elva-local') {
      const args = ['--no-store']
      if (manyConns) args.push('--max-connections', '20000', '--max-per-document', '1000')
      const relay = startProc(kind, bins.elva, [...args, '127.0.0.1', '0'])
      started.push(relay)
      const [, addr] = await waitLine(relay, /msg=listening addr=(\S+)/, 'listening line')
      return { pid: relay.pid, url: `ws://${addr}/`, stop, proc: relay }
    }
    const port = await freePort()
    if (kind === 'rawrelay') {
      const p = startProc(kind, bins.rawrelay, ['-addr', `127.0.0.1:${port}`])
      started.push(p)
      await waitTCP(p, port)
      return { pid: p.pid, url: `ws://127.0.0.1:${port}/`, stop, proc: p }
    }
    if (!fs.existsSync(yjsServerScript)) throw new Error(`${yjsServerScript} missing: run npm ci in ${here}`)
    const p = startProc(kind, process.execPath, [yjsServerScript], { cwd: here, env: { HOST: '127.0.0.1', PORT: String(port) } })
    started.push(p)
    await waitLine(p, /^running at /, 'running line')
    await waitTCP(p, port)
    return { pid: p.pid, url: `ws://127.0.0.1:${port}/`, stop, proc: p }
  } catch (err) {
    await stop()
    throw err
  }
}

// --- clients ---------------------------------------------------------

/** openWS resolves with an open WebSocket to url, or rejects. */
const openWS = (url, timeoutMs = 10000) => new Promise((resolve, reject) => {
  const ws = new WebSocket(url, { perMessageDeflate: false, handshakeTimeout: timeoutMs })
  const onError = (err) => {
    ws.terminate()
    reject(new Error(`${url}: ${err.message}`))
  }
  ws.once('error', onError)
  ws.once('open', () => {
    ws.off('error', onError)
    ws.on('error', () => {}) // the close that follows is what counts
    resolve(ws)
  })
})

/** openMany opens a socket to every url, at most concurrency handshakes
 * at a time; it resolves with the sockets and the errors. */
const openMany = async (urls, concurrency) => {
  const socks = []
  const errors = []
  let next = 0
  const worker = async () => {
    while (next < urls.length) {
      const url = urls[next++]
      try {
        socks.push(await openWS(url))
      } catch (err) {
        errors.push(err.message)
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, urls.length) }, worker))
  return { socks, errors }
}

const closeAll = (socks) => { for (const ws of socks) ws.terminate() }

// --- workloads -------------------------------------------------------

const docName = (w, i) => `load-${w}-${i}`

/** runFanout runs one fan-out workload against srv: per document one
 * writer and w.readers readers; each writer sends w.count messages, as
 * fast as w.window messages in flight allow, or at w.rate per second. */
const runFanout = async (srv, w, msgs) => {
  const writers = []
  const readerSocks = []
  const all = []
  try {
    for (let d = 0; d < w.docs; d++) {
      const url = srv.url + docName(w.id, d)
      const opened = await openMany(Array(w.readers).fill(url), w.readers)
      all.push(...opened.socks)
      if (opened.errors.length) throw new Error(`reader connections failed: ${opened.errors[0]}`)
      const ws = await openWS(url)
      all.push(ws)
      const wr = { ws, sent: 0, done: 0, sendAt: new Float64Array(w.count), got: new Uint16Array(w.count) }
      writers.push(wr)
      for (const r of opened.socks) readerSocks.push([r, wr])
    }
  } catch (err) {
    closeAll(all)
    throw err
  }
  // The joins' own messages (step 1s, awareness queries) settle first.
  await sleep(300)

  const expected = w.docs * w.readers * w.count
  const lat = new Float64Array(expected)
  let delivered = 0
  let outOfOrder = 0
  let lastAt = 0
  let failure = null
  let finish
  const finished = new Promise((resolve) => { finish = resolve })

  const pump = (wr) => {
    while (wr.sent < w.count && wr.sent - wr.done < w.window) {
      wr.sendAt[wr.sent] = performance.now()
      wr.ws.send(msgs[wr.sent])
      wr.sent++
    }
  }
  for (const [ws, wr] of readerSocks) {
    let next = 0
    ws.on('message', (data) => {
      const seq = seqOf(data)
      if (seq < 0 || seq >= w.count) return
      const now = performance.now()
      if (seq !== next) outOfOrder++
      next = seq + 1
      lat[delivered++] = now - wr.sendAt[seq]
      lastAt = now
      if (++wr.got[seq] === w.readers) {
        wr.done++
        if (!w.rate) pump(wr)
      }
      if (delivered === expected) finish()
    })
  }
  for (const [ws, role] of [...readerSocks.map(([ws]) => [ws, 'reader']), ...writers.map((wr) => [wr.ws, 'writer'])]) {
    ws.on('close', (code, reason) => {
      if (delivered < expected && !failure) {
        failure = `a ${role} was closed by the server (code ${code}${reason.length ? ' ' + reason : ''})`
        finish()
      }
    })
  }

  const cpu0 = cpuTicks(srv.pid)
  const t0 = performance.now()
  let pacer = null
  if (w.rate) {
    // Writer i sends message k at t0 + (k + i/writers) / rate: evenly
    // spread, each at its own time; the send time is taken when it is
    // sent, so a late timer adds nothing to the latency measured.
    const gap = 1000 / w.rate
    pacer = setInterval(() => {
      const now = performance.now()
      writers.forEach((wr, i) => {
        const due = Math.min(w.count, Math.floor((now - t0) / gap - i / writers.length) + 1)
        while (wr.sent < due && wr.sent - wr.done < w.window) {
          wr.sendAt[wr.sent] = performance.now()
          wr.ws.send(msgs[wr.sent])
          wr.sent++
        }
      })
    }, 1)
  } else {
    for (const wr of writers) pump(wr)
  }
  let lastCount = 0
  let lastProgress = t0
  const watch = setInterval(() => {
    const now = performance.now()
    if (delivered !== lastCount) {
      lastCount = delivered
      lastProgress = now
    }
    if (srv.proc.status !== null) failure ??= `the server exited (${srv.proc.status}):${tailOf(srv.proc)}`
    else if (now - lastProgress > stallTimeout) failure ??= `stalled: ${delivered} of ${expected} deliveries after ${((now - t0) / 1000).toFixed(1)} s`
    if (failure) finish()
  }, 200)
  await finished
  const cpu1 = srv.proc.status === null ? cpuTicks(srv.pid) : cpu0
  clearInterval(watch)
  clearInterval(pacer)
  const rss = srv.proc.status === null ? rssKiB(srv.pid) : NaN
  closeAll(all)
  if (failure) throw new Error(failure)

  const seconds = (lastAt - t0) / 1000
  const cpuSeconds = (cpu1 - cpu0) / clkTck
  const sorted = lat.sort()
  const pct = (q) => sorted[Math.max(0, Math.ceil(q * sorted.length) - 1)]
  return {
    deliveries: delivered,
    outOfOrder,
    seconds,
    perSecond: delivered / seconds,
    cpuSeconds,
    perCPUSecond: cpuSeconds > 0 ? delivered / cpuSeconds : NaN,
    cpuMicrosPerDelivery: cpuSeconds * 1e6 / delivered,
    p50: pct(0.5),
    p99: pct(0.99),
    max: sorted[sorted.length - 1],
    rssMiB: rss / 1024
  }
}

/** runIdle opens w.conns connections over w.docs documents, holds them
 * for w.holdMs and measures RSS before and after, and CPU while held. */
const runIdle = async (srv, w) => {
  await sleep(w.settleMs) // the start's own allocations settle
  const before = rssKiB(srv.pid)
  const urls = Array.from({ length: w.conns }, (_, i) => srv.url + docName(w.id, i % w.docs))
  const t0 = performance.now()
  const { socks, errors } = await openMany(urls, 200)
  const openSeconds = (performance.now() - t0) / 1000
  let closed = 0
  for (const ws of socks) ws.on('close', () => { closed++ })
  await sleep(w.settleMs) // the joins' messages settle
  const cpu0 = cpuTicks(srv.pid)
  const h0 = performance.now()
  await sleep(w.holdMs)
  const held = (performance.now() - h0) / 1000
  const alive = srv.proc.status === null
  const cpu1 = alive ? cpuTicks(srv.pid) : cpu0
  const after = alive ? rssKiB(srv.pid) : NaN
  const lost = closed
  closeAll(socks)
  if (!alive) throw new Error(`the server exited (${srv.proc.status}):${tailOf(srv.proc)}`)
  return {
    conns: socks.length,
    errors: errors.length + lost,
    firstError: errors[0] ?? (lost ? `${lost} connections closed by the server while idle` : undefined),
    openPerSecond: socks.length / openSeconds,
    rssBeforeMiB: before / 1024,
    rssAfterMiB: after / 1024,
    kibPerConn: (after - before) / Math.max(1, socks.length),
    idleCPUPercent: (cpu1 - cpu0) / clkTck / held * 100
  }
}

/** runRest connects five y-websocket editors on two documents to every
 * server in srvs at once, types nothing, and measures each server's CPU
 * and RSS over w.seconds. */
const runRest = async (srvs, w) => {
  const editors = []
  const connect = (url, doc, name) => new Promise((resolve, reject) => {
    const ydoc = new Y.Doc()
    const provider = new WebsocketProvider(url, doc, ydoc, { WebSocketPolyfill: WebSocket, disableBc: true })
    provider.awareness.setLocalStateField('user', { name })
    editors.push({ ydoc, provider })
    const timer = setTimeout(() => reject(new Error(`editor ${name} not connected to ${url} after 10 s`)), 10000)
    provider.on('status', ({ status }) => {
      if (status === 'connected') {
        clearTimeout(timer)
        resolve()
      }
    })
  })
  const results = new Map()
  try {
    const joined = await Promise.allSettled(srvs.map((srv) => Promise.all(
      Array.from({ length: 5 }, (_, i) => connect(srv.url.slice(0, -1), docName(w.id, i % 2), `editor${i}`)))))
    joined.forEach((j, i) => { if (j.status === 'rejected') results.set(srvs[i], j.reason) })
    await sleep(1000) // the syncs and first awareness settle
    const t0 = performance.now()
    const before = new Map(srvs.map((s) => [s, s.proc.status === null ? cpuTicks(s.pid) : 0]))
    await sleep(w.seconds * 1000)
    const seconds = (performance.now() - t0) / 1000
    for (const srv of srvs) {
      if (results.has(srv)) continue
      if (srv.proc.status !== null) {
        results.set(srv, new Error(`the server exited (${srv.proc.status}):${tailOf(srv.proc)}`))
        continue
      }
      results.set(srv, {
        cpuPercent: (cpuTicks(srv.pid) - before.get(srv)) / clkTck / seconds * 100,
        rssMiB: rssKiB(srv.pid) / 1024
      })
    }
  } finally {
    for (const e of editors) {
      e.provider.destroy()
      e.ydoc.destroy()
    }
  }
  return results
}

// --- the plan --------------------------------------------------------

const W = short
  ? {
      a: { docs: 1, readers: 5, count: 200, size: 200, window: 64 },
      b: { docs: 1, readers: 5, count: 100, size: 200, window: 1000, rate: 200 },
      c: { docs: 1, readers: 50, count: 200, size: 200, window: 64 },
      d: { docs: 1, readers: 5, count: 20, size: 65536, window: 8 },
      e: { conns: 200, docs: 20, holdMs: 500, settleMs: 200 },
      f: { seconds: 3 }
    }
  : {
      a: { docs: 10, readers: 5, count: 3000, size: 200, window: 64 },
      b: { docs: 10, readers: 5, count: 1000, size: 200, window: 1000, rate: 200 },
      c: { docs: 1, readers: 50, count: 2000, size: 200, window: 64 },
      d: { docs: 10, readers: 5, count: 100, size: 65536, window: 8 },
      e: { conns: 10000, docs: 1000, holdMs: 10000, settleMs: 1000 },
      f: { seconds: 60 }
    }
for (const [id, w] of Object.entries(W)) w.id = id

const describe = (w) => {
  const n = (x) => x.toLocaleString('en-US')
  switch (w.id) {
    case 'e': return `(e) ${n(w.conns)} idle connections over ${n(w.docs)} documents, held ${w.holdMs / 1000} s`
    case 'f': return `(f) at rest: 5 editors on 2 documents, nothing typed, ${w.seconds} s`
    default: {
      const size = w.size >= 1024 ? `${w.size / 1024} KiB` : `${w.size} B`
      const pace = w.rate ? `paced ${w.rate} msg/s per writer` : `window ${w.window}`
      return `(${w.id}) ${w.docs} doc${w.docs > 1 ? 's' : ''} × 1 writer × ${w.readers} readers, ${n(w.count)} × ${size}, ${pace}`
    }
  }
}

// Rows of the table per workload: [label, key, digits, better].
const fanoutRows = [
  ['deliveries per server CPU-second', 'perCPUSecond', 0],
  ['server CPU µs per delivery', 'cpuMicrosPerDelivery', 1],
  ['delivered messages/s', 'perSecond', 0],
  ['latency p50 (ms)', 'p50', 2],
  ['latency p99 (ms)', 'p99', 2],
  ['latency max (ms)', 'max', 2],
  ['server RSS at the end (MiB)', 'rssMiB', 1]
]
const rowsOf = {
  a: fanoutRows,
  b: [fanoutRows[3], fanoutRows[4], fanoutRows[5], fanoutRows[0], fanoutRows[2], fanoutRows[6]],
  c: fanoutRows,
  d: fanoutRows,
  e: [
    ['RSS per idle connection (KiB)', 'kibPerConn', 1],
    ['RSS before → after (MiB)', null, 1],
    ['connections failed or lost', 'errors', 0],
    ['server CPU while idle (% of one core)', 'idleCPUPercent', 3],
    ['connections opened per second', 'openPerSecond', 0]
  ],
  f: [
    ['server CPU (% of one core)', 'cpuPercent', 3],
    ['server RSS (MiB)', 'rssMiB', 1]
  ]
}

const fmt = (x, digits) => Number.isFinite(x)
  ? x.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits })
  : '–'

/** cell is one figure of the table, with its ratio to rawrelay's. */
const cell = (res, base, key, digits) => {
  if (!res) return 'not run'
  if (res instanceof Error) return 'failed'
  if (key === null) return `${fmt(res.rssBeforeMiB, 1)} → ${fmt(res.rssAfterMiB, 1)}`
  const v = res[key]
  let s = fmt(v, digits)
  if (base && !(base instanceof Error) && key !== 'errors') {
    const b = base[key]
    if (Number.isFinite(v) && Number.isFinite(b) && b !== 0) s += ` (${(v / b).toFixed(2)}×)`
  }
  return s
}

const machine = () => {
  const cpu = /^model name\s*:\s*(.*)$/m.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? os.cpus()[0]?.model ?? '?'
  const gov = spawnSync('go', ['version'], { encoding: 'utf8' }).stdout?.trim().split(' ')[2] ?? '?'
  return { cpu, cores: os.availableParallelism?.() ?? os.cpus().length, go: gov, node: process.version, kernel: `${os.type()} ${os.release()}`, clkTck }
}

const main = async () => {
  const started = performance.now()
  const notes = []
  const workloads = [...new Set(opts.workloads.replaceAll(',', '').split(''))].filter((id) => W[id]).sort()
  if (workloads.length === 0) throw new Error(`--workloads ${opts.workloads}: want letters among a,b,c,d,e,f`)
  let servers = opts.servers.split(',').map((s) => s.trim()).filter(Boolean)
  for (const s of servers) if (!serverInfo[s]) throw new Error(`--servers: unknown server ${s}; want elva, elva-store, elva-local, rawrelay, yjs`)
  build(notes)
  if (!bins.rawrelay) servers = servers.filter((s) => s !== 'rawrelay')

  const lim = noFileLimit()
  const limText = (l) => l.soft === Infinity ? 'unlimited' : String(l.soft)
  if (lim.soft < wantNoFile) notes.push(`RLIMIT_NOFILE could not be raised to ${wantNoFile}: ${limText(lim)} (hard limit ${lim.hard === Infinity ? 'unlimited' : lim.hard}); servers run under the same ulimit`)
  else notes.push(`RLIMIT_NOFILE ${limText(lim)} for this process and the servers (sh -c 'ulimit -n ${wantNoFile}; exec ...')`)
  if (W.e && workloads.includes('e') && lim.soft < W.e.conns + 500) {
    const n = Math.max(100, Math.floor((lim.soft - 500) / 100) * 100)
    notes.push(`(e) asked for ${W.e.conns} connections; the open-file limit allows ${n}`)
    W.e.conns = n
  }
  if (workloads.includes('e') && servers.some((s) => s.startsWith('elva'))) {
    notes.push('(e): elva-service runs with --max-connections 20000 --max-per-document 1000 (defaults 1024 and 256)')
  }
  if (short) notes.push('--short: counts this small check that every server and workload runs; the figures mean little (CPU time comes in 10 ms clock ticks)')
  if (servers.some((s) => s.startsWith('elva'))) {
    notes.push('elva-service\'s upstream goes to elva-server.mjs --mode broadcast (a Node process); its CPU is not counted as the relay\'s, but it shares the cores')
  }

  const results = {} // server → workload → result | Error
  for (const s of servers) results[s] = {}
  const msgs = {}
  for (const id of workloads) {
    const w = W[id]
    if (w.size) {
      const key = `${w.size}`
      const count = Math.max(...workloads.filter((x) => W[x].size === w.size).map((x) => W[x].count))
      msgs[key] ??= buildMessages(count, w.size)
      w.msgBytes = msgs[key][0].length
    }
    log(describe(w))
    if (id === 'f') {
      const srvs = []
      for (const s of servers) {
        try {
          srvs.push(Object.assign(await startServer(s), { kind: s }))
        } catch (err) {
          results[s][id] = err
          log(`  ${s}: ${err.message}`)
        }
      }
      try {
        const got = await runRest(srvs, w)
        for (const srv of srvs) results[srv.kind][id] = got.get(srv)
      } catch (err) {
        for (const srv of srvs) results[srv.kind][id] = err
        log(`  ${err.message}`)
      }
      for (const srv of srvs) {
        if (!await srv.stop()) notes.push(`(${id}) ${srv.kind} did not stop within ${stopTimeout / 1000} s of SIGTERM and was killed`)
        const r = results[srv.kind][id]
        log(`  ${srv.kind}: ${r instanceof Error ? r.message : JSON.stringify(r)}`)
      }
      continue
    }
    for (const s of servers) {
      let srv
      try {
        srv = await startServer(s, { manyConns: id === 'e' })
        results[s][id] = id === 'e' ? await runIdle(srv, w) : await runFanout(srv, w, msgs[`${w.size}`])
        const r = results[s][id]
        log(`  ${s}: ${JSON.stringify(r, (k, v) => typeof v === 'number' ? Number(v.toPrecision(4)) : v)}`)
        if (r.firstError) notes.push(`(${id}) ${s}: ${r.errors} connections failed or were lost; the first: ${r.firstError}`)
      } catch (err) {
        results[s][id] = err
        log(`  ${s}: ${err.message}`)
      } finally {
        if (srv && !await srv.stop()) notes.push(`(${id}) ${s} did not stop within ${stopTimeout / 1000} s of SIGTERM and was killed`)
      }
    }
  }
  for (const s of servers) {
    for (const id of workloads) {
      if (results[s][id] instanceof Error) notes.push(`(${id}) ${s} failed: ${results[s][id].message}`)
    }
  }
  for (const size of new Set(workloads.map((id) => W[id].size).filter(Boolean))) {
    const ids = workloads.filter((id) => W[id].size === size)
    notes.push(`${ids.map((id) => `(${id})`).join(', ')}: each message is one Yjs update of ${W[ids[0]].msgBytes} bytes on the wire, a ${size}-byte string inserted at the ${opts.append ? 'end (--append)' : 'start'} of a Y.Text`)
  }

  const argv = process.argv.slice(2)
  const scriptPath = path.relative(process.cwd(), fileURLToPath(import.meta.url)) || 'load.mjs'
  const command = ['node', scriptPath, ...argv].join(' ')
  const m = machine()
  const lines = []
  const head = ['workload', 'metric', ...servers.map((s) => serverInfo[s].title)]
  lines.push(`| ${head.join(' | ')} |`)
  lines.push(`|${head.map(() => '---').join('|')}|`)
  for (const id of workloads) {
    for (const [label, key, digits] of rowsOf[id]) {
      const base = results.rawrelay?.[id]
      lines.push(`| ${describe(W[id])} | ${label} | ${servers.map((s) => cell(results[s][id], base, key, digits)).join(' | ')} |`)
    }
  }
  const seconds = (performance.now() - started) / 1000
  const table = [
    lines.join('\n'),
    '',
    `Machine: ${m.cpu}, ${m.cores} cores, ${m.kernel}; ${m.go}, Node ${m.node}; CLK_TCK ${m.clkTck}.`,
    `Command: \`${command}\` (in ${process.cwd()}); ${seconds.toFixed(0)} s in all.`,
    bins.rawrelay ? 'In parentheses: the ratio to rawrelay\'s figure in the same run (higher is better for throughput, lower for latency, CPU and memory).' : null,
    ...notes.map((n) => `- ${n}`)
  ].filter((l) => l !== null).join('\n')
  const failed = servers.some((s) => workloads.some((id) => results[s][id] instanceof Error || results[s][id]?.errors > 0))
  if (opts.json) {
    const plain = {}
    for (const s of servers) {
      plain[s] = {}
      for (const id of workloads) {
        const r = results[s][id]
        plain[s][id] = r instanceof Error ? { error: r.message } : r
      }
    }
    process.stdout.write(JSON.stringify({ ok: !failed, machine: m, command, seconds, servers, workloads, rawrelay: !!bins.rawrelay, notes, results: plain, table }, null, 2) + '\n')
  } else {
    process.stdout.write(table + '\n')
  }
  return failed ? 1 : 0
}

let code = 1
try {
  code = await main()
} catch (err) {
  log(err.message)
} finally {
  if (!stopping) {
    await cleanup()
    process.exit(code)
  }
}
