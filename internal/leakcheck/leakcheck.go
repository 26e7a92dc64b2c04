// Package leakcheck lists the running goroutines, for tests that check
// that none of theirs is left behind.
package leakcheck

import (
	"bytes"
	"context"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
)

// Stacks returns the stack of every goroutine, the caller's first, one
// string each, as runtime.Stack prints them.
func Stacks() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Split(string(buf[:n]), "\n\n")
		}
		buf = make([]byte, 2*len(buf))
	}
}

// Label sets the pprof label key=value on the calling goroutine. Every
// goroutine it starts from then on carries the label too, and so do the
// goroutines those start: a test that labels itself first can tell its
// goroutines from those of tests running in parallel.
func Label(key, value string) {
	pprof.SetGoroutineLabels(pprof.WithLabels(context.Background(), pprof.Labels(key, value)))
}

// Labelled returns the stack of every goroutine that carries the pprof
// label key=value, one string each: the functions of its frames, one a
// line, as the goroutine profile prints them.
func Labelled(key, value string) []string {
	var buf bytes.Buffer
	if err := pprof.Lookup("goroutine").WriteTo(&buf, 1); err != nil {
		panic("leakcheck: " + err.Error())
	}
	want := "# labels: {" + strconv.Quote(key) + ":" + strconv.Quote(value) + "}"
	var stacks []string
	for _, group := range strings.Split(buf.String(), "\n\n") {
		lines := strings.Split(group, "\n")
		if len(lines) < 2 || lines[1] != want {
			continue // another label, or none
		}
		n, err := strconv.Atoi(strings.Fields(lines[0])[0]) // "N @ 0x… 0x…"
		if err != nil {
			continue
		}
		stack := strings.Join(lines[2:], "\n")
		for range n {
			stacks = append(stacks, stack)
		}
	}
	return stacks
}
