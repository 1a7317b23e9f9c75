// The relay's status page (status.html) in a real browser: headless
// Chromium (the system's, /usr/bin/chromium or $CHROMIUM) driven with
// playwright-core, for TestInteropStatusPage and for the README's
// screenshot.
//
//   node status-page.mjs                     commands on stdin (the test)
//   node status-page.mjs [--screenshot FILE] [--polls N] URL
//       opens URL, waits until the page refreshed itself N times (default
//       5), saves a screenshot of the whole page to FILE (PNG) if asked,
//       prints what the page shows (JSON) and exits
//
// Command mode reads one JSON command per line on stdin and answers each
// with one JSON line on stdout ({"ok": true, ...} or {"ok": false,
// "error": ...}), like editors.mjs:
//
//   {"cmd":"open","url":"http://127.0.0.1:PORT/"}
//       starts the browser with a fresh profile, opens url and answers with
//       what the page shows once it refreshed itself once, and the
//       profile's folder (profile: the test looks for processes left behind
//       with it). It sets a random marker in window, which a reload would
//       lose.
//   {"cmd":"read"}   answers with what the page shows now
//   {"cmd":"waitFor","show":{"upstream":{"state":"connected"}},"minPolls":3,"timeoutMs":20000}
//       waits until what the page shows contains show (objects match on
//       the keys given, other values by equality) and the page refreshed
//       itself at least minPolls times; answers with what it shows (ok
//       false on timeout, with what it showed last)
//   {"cmd":"quit"}   closes the browser, removes the profile and exits
//
// What the page shows ("page" in every answer): marker, loads (load events
// of the page: 1 unless it reloaded), polls and state (of <body>), reach,
// version, uptime, listening, editors, joins, drops, refusals, closes,
// upstream {state, protocol, server, since, connections, reconnects,
// failures, error, close}, store {dir, documents, bytes, problem, owed},
// documents {name: {name (as shown), editors, rate, messages_in,
// bytes_in, messages_out, bytes_out, held, owed}}, order (names, top to
// bottom), graph (name → points drawn), consoleErrors, pageErrors and
// failedRequests, all as text the page shows.
//
// The browser never reaches out on its own (no network here besides the
// relay): background networking, component updates, sync and QUIC are off.
// Every run ends by itself after --timeout seconds (default 120).

import { chromium } from 'playwright-core'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomUUID } from 'node:crypto'
import { serveCommands } from './commands.mjs'

const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium'
const chromiumArgs = [
  '--no-sandbox', // root in CI, no user namespaces
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync'
]

const args = process.argv.slice(2)
const option = (name, fallback) => {
  const i = args.indexOf(name)
  if (i < 0) return fallback
  const value = args[i + 1]
  args.splice(i, 2)
  return value
}
const screenshotFile = option('--screenshot')
const wantPolls = Number(option('--polls', '5'))
const timeoutSeconds = Number(option('--timeout', '120'))
const oneShotURL = args[0]

// The browser session: one context with one page.
let context = null
let page = null
let profile = null
let loads = 0
const consoleErrors = []
const pageErrors = []
const failedRequests = []

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

// open starts Chromium with a fresh profile and loads url.
async function open ({ url }) {
  if (page) throw new Error('a page is open already')
  profile = mkdtempSync(join(tmpdir(), 'elva-status-page-'))
  context = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath,
    headless: true,
    args: chromiumArgs,
    viewport: { width: 1000, height: 800 },
    colorScheme: 'light',
    timeout: 30000,
    // A signal ends the run through close (below), which also removes the
    // profile.
    handleSIGINT: false,
    handleSIGTERM: false,
    handleSIGHUP: false
  })
  page = context.pages()[0] ?? await context.newPage()
  page.on('console', (msg) => {
    if (msg.type() === 'error') consoleErrors.push(`${msg.text()} (${msg.location().url})`)
  })
  page.on('pageerror', (err) => pageErrors.push(String(err)))
  page.on('requestfailed', (req) => failedRequests.push(`${req.url()}: ${req.failure()?.errorText}`))
  page.on('load', () => { loads++ })
  await page.goto(url, { waitUntil: 'load', timeout: 15000 })
  await page.evaluate((marker) => { window.statusPageMarker = marker }, randomUUID())
  const shown = await waitFor({ minPolls: 1, timeoutMs: 15000 })
  return { ...shown, profile }
}

// read returns what the page shows, from the DOM. A page that navigates
// away (a reload) while it is read is read again once it has loaded: the
// reload shows in loads and marker, not as an error here.
async function read () {
  if (!page) throw new Error('no page open')
  let shown
  for (let tries = 0; !shown; tries++) {
    try {
      shown = await page.evaluate(readDOM)
    } catch (err) {
      if (tries > 0 || !/navigat|context was destroyed/i.test(err.message)) throw err
      await page.waitForLoadState('load', { timeout: 15000 })
    }
  }
  return {
    page: {
      ...shown,
      loads,
      consoleErrors: [...consoleErrors],
      pageErrors: [...pageErrors],
      failedRequests: [...failedRequests]
    }
  }
}

// readDOM runs in the page: what it shows.
function readDOM () {
  const text = (id) => document.getElementById(id)?.textContent ?? null
  const documents = {}
  const order = []
  for (const row of document.querySelectorAll('#documents tr[data-doc]')) {
    const cells = {}
    for (const td of row.querySelectorAll('td[data-field]')) cells[td.dataset.field] = td.textContent
    documents[row.dataset.doc] = cells
    order.push(row.dataset.doc)
  }
  const graph = {}
  for (const line of document.querySelectorAll('#graph polyline')) {
    graph[line.dataset.doc] = line.getAttribute('points').split(' ').filter(Boolean).length
  }
  return {
    marker: window.statusPageMarker ?? null,
    polls: Number(document.body.dataset.polls),
    state: document.body.dataset.state,
    reach: text('reach'),
    version: text('version'),
    uptime: text('uptime'),
    listening: text('listening'),
    editors: text('editors'),
    joins: text('joins'),
    drops: text('drops'),
    refusals: text('refusals'),
    closes: text('closes'),
    upstream: {
      state: text('upstream-state'),
      protocol: text('upstream-protocol'),
      server: text('upstream-server'),
      since: text('upstream-since'),
      connections: text('upstream-connections'),
      reconnects: text('upstream-reconnects'),
      failures: text('upstream-failures'),
      error: text('upstream-error'),
      close: text('upstream-close')
    },
    store: {
      dir: text('store-dir'),
      documents: text('store-documents'),
      bytes: text('store-bytes'),
      problem: text('store-error'),
      owed: [...document.querySelectorAll('#store-owed li')].map((li) => li.textContent)
    },
    documents,
    order,
    graph
  }
}

// contains tells whether got has everything in want: objects on want's
// keys, everything else by equality.
function contains (got, want) {
  if (want === null || typeof want !== 'object') return got === want
  if (got === null || typeof got !== 'object') return false
  return Object.keys(want).every((k) => contains(got[k], want[k]))
}

// waitFor reads the page every 50 ms until it shows show and has
// refreshed itself minPolls times.
async function waitFor ({ show, minPolls, timeoutMs }) {
  const deadline = Date.now() + (timeoutMs ?? 20000)
  for (;;) {
    const shown = await read()
    if (shown.page.polls >= (minPolls ?? 0) && contains(shown.page, show ?? {})) return shown
    if (Date.now() > deadline) {
      const want = `show ${JSON.stringify(show ?? {})} after ${minPolls ?? 0} refreshes`
      return { ok: false, error: `the page did not get to ${want} within ${timeoutMs ?? 20000} ms`, ...shown }
    }
    await sleep(50)
  }
}

// screenshot saves the whole page to file, as PNG.
async function screenshot (file) {
  await page.screenshot({ path: file, fullPage: true })
}

// close ends the browser and removes its profile; it is safe to call twice.
async function close () {
  const ctx = context
  context = page = null
  if (ctx) await ctx.close().catch(() => {})
  if (profile) rmSync(profile, { recursive: true, force: true })
  profile = null
}

const commands = {
  open,
  read,
  waitFor,
  quit: async () => {
    await close()
    setTimeout(() => process.exit(0), 10)
    return {}
  }
}

// quitFor ends the run early: the browser closes and the profile goes.
async function quitFor (why) {
  process.stderr.write(`status-page.mjs: ${why}, quitting\n`)
  await close()
  process.exit(2)
}

// The hard bound on the whole run: a stuck browser must not outlive it.
setTimeout(() => quitFor(`still running after ${timeoutSeconds} s`), timeoutSeconds * 1000).unref()
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(signal, () => quitFor(signal))

if (oneShotURL) {
  try {
    await open({ url: oneShotURL })
    const shown = await waitFor({ minPolls: wantPolls, timeoutMs: (wantPolls + 10) * 1500 })
    if (screenshotFile) await screenshot(screenshotFile)
    process.stdout.write(JSON.stringify(shown.page, null, 2) + '\n')
    await close()
    process.exit(shown.ok === false ? 1 : 0)
  } catch (err) {
    process.stderr.write(`status-page.mjs: ${err.message}\n`)
    await close()
    process.exit(1)
  }
} else {
  // Commands run one at a time, in order; the end of input quits.
  serveCommands(commands)
}
