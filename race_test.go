//go:build race

package main

// raceEnabled makes the interop tests build the relay binary with -race too.
const raceEnabled = true
