// Package leakcheck lists the running goroutines, for tests that check
// that none of theirs is left behind.
package leakcheck

import (
	"runtime"
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
