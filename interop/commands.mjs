// serveCommands runs a driver's commands from its stdin, one JSON object
// per line ({"cmd": NAME, ...}), one at a time and in order, and writes
// one answer line per command: {"ok": true, ...what the command returned}
// or {"ok": false, "error": ...}. The end of input runs commands.quit.
// The Go side is interop_test.go's lineDriver.

import { createInterface } from 'node:readline'

export const serveCommands = (commands) => {
  let queue = Promise.resolve()
  createInterface({ input: process.stdin }).on('line', (line) => {
    queue = queue.then(async () => {
      let answer
      try {
        const cmd = JSON.parse(line)
        const run = commands[cmd.cmd]
        if (!run) throw new Error(`unknown command ${cmd.cmd}`)
        answer = { ok: true, ...(await run(cmd)) }
      } catch (err) {
        answer = { ok: false, error: err.message }
      }
      process.stdout.write(JSON.stringify(answer) + '\n')
    })
  }).on('close', () => {
    queue.then(() => commands.quit())
  })
}
