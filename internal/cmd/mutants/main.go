// Command mutants is certmgr's curated mutation check: it breaks each of
// the library's safety rules in turn, in a small, plausible way, and runs
// the tests that claim to prove the rule. Every mutant must be killed: a
// test that passes with the rule broken proves nothing.
//
// Each mutant replaces one piece of source, which must occur exactly once
// in its file, through go test's -overlay: the tree is never changed, and
// only the packages that depend on the file build again. The check fails
// if a mutant survives, or if its piece of source is no longer in the
// file (the code changed: update the mutant with it). A new safety rule
// adds its mutant to the list in mutants.go.
//
// Usage, from the repository's root:
//
//	go run ./internal/cmd/mutants [-run regexp] [-v]
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// mutant is one broken safety rule.
type mutant struct {
	name  string // the rule it breaks
	file  string // the file it changes, from the repository's root
	old   string // the source it replaces: exactly once in file
	new   string // what replaces it
	pkg   string // the package whose tests must kill it, as go test names it ("." or "./etcdcache")
	tests string // those tests: a go test -run pattern
}

func main() {
	only := flag.String("run", "", "run only the mutants whose name matches this regexp")
	verbose := flag.Bool("v", false, "show the output of every go test")
	timeout := flag.Duration("timeout", 3*time.Minute, "the go test -timeout of each mutant")
	flag.Parse()
	var re *regexp.Regexp
	if *only != "" {
		var err error
		if re, err = regexp.Compile(*only); err != nil {
			fmt.Fprintln(os.Stderr, "mutants:", err)
			os.Exit(2)
		}
	}
	tmp, err := os.MkdirTemp("", "certmgr-mutants-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "mutants:", err)
		os.Exit(2)
	}
	defer os.RemoveAll(tmp)

	start := time.Now()
	failed, ran := 0, 0
	for i, m := range mutants {
		if re != nil && !re.MatchString(m.name) {
			continue
		}
		ran++
		t0 := time.Now()
		out, verdict := run(m, filepath.Join(tmp, fmt.Sprint(i)), *timeout)
		if verdict != "killed" {
			failed++
		}
		fmt.Printf("%-8s %-58s %6.1fs  %s\n", verdict, m.name, time.Since(t0).Seconds(), m.tests)
		if *verbose || verdict != "killed" {
			fmt.Println(indent(out))
		}
	}
	fmt.Printf("%d mutants, %d killed, %d not, in %v\n", ran, ran-failed, failed, time.Since(start).Round(time.Second))
	if failed > 0 || ran == 0 {
		os.Exit(1)
	}
}

// run applies m through an overlay in dir and runs its tests. The verdict
// is "killed" (the tests failed), "SURVIVED" (they passed) or
// "STALE" (the source to replace is not in the file once).
func run(m mutant, dir string, timeout time.Duration) (output, verdict string) {
	src, err := os.ReadFile(m.file)
	if err != nil {
		return err.Error(), "STALE"
	}
	if n := bytes.Count(src, []byte(m.old)); n != 1 {
		return fmt.Sprintf("%s holds the source to replace %d times, want once", m.file, n), "STALE"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err.Error(), "STALE"
	}
	abs, err := filepath.Abs(m.file)
	if err != nil {
		return err.Error(), "STALE"
	}
	mutated := filepath.Join(dir, filepath.Base(m.file))
	if err := os.WriteFile(mutated, bytes.Replace(src, []byte(m.old), []byte(m.new), 1), 0o644); err != nil {
		return err.Error(), "STALE"
	}
	overlay, err := json.Marshal(map[string]map[string]string{"Replace": {abs: mutated}})
	if err != nil {
		return err.Error(), "STALE"
	}
	overlayFile := filepath.Join(dir, "overlay.json")
	if err := os.WriteFile(overlayFile, overlay, 0o644); err != nil {
		return err.Error(), "STALE"
	}
	cmd := exec.Command("go", "test", "-overlay", overlayFile, "-count=1", "-failfast",
		"-timeout", timeout.String(), "-run", m.tests, m.pkg)
	out, err := cmd.CombinedOutput()
	switch {
	case err == nil:
		return string(out), "SURVIVED"
	case bytes.Contains(out, []byte("[build failed]")) || bytes.Contains(out, []byte("[setup failed]")):
		return string(out), "STALE" // the mutant does not compile: it kills nothing
	}
	return string(out), "killed"
}

func indent(s string) string {
	s = strings.TrimRight(s, "\n")
	if len(s) > 4000 {
		s = "…" + s[len(s)-4000:]
	}
	return "    " + strings.ReplaceAll(s, "\n", "\n    ")
}
