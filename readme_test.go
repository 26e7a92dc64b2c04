package certmgr

import (
	"bufio"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestREADMECodeIsInTheTree: every Go block of the README is preceded by
// a line "<!-- from: PATH -->" naming a file of the repository that holds
// the block's lines, in order and one after the other (indentation
// aside): the README shows code that compiles, and that go vet and the
// tests check where it lives.
func TestREADMECodeIsInTheTree(t *testing.T) {
	f, err := os.Open("README.md")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var (
		from    string
		block   []string
		inBlock bool
		blocks  int
	)
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		switch {
		case inBlock && line == "```":
			inBlock = false
			blocks++
			if from == "" {
				t.Errorf("README.md: the Go block ending at line %d names no file (<!-- from: PATH --> before it)", n)
				continue
			}
			checkExcerpt(t, from, block)
			from = ""
		case inBlock:
			block = append(block, strings.TrimSpace(line))
		case line == "```go":
			inBlock, block = true, nil
		case strings.HasPrefix(line, "<!-- from: ") && strings.HasSuffix(line, " -->"):
			from = strings.TrimSuffix(strings.TrimPrefix(line, "<!-- from: "), " -->")
		case strings.TrimSpace(line) != "":
			from = "" // the marker must come right before its block
		}
	}
	if blocks == 0 {
		t.Error("README.md has no Go block")
	}
}

// checkExcerpt fails t unless the file path holds lines, trimmed, one
// after the other.
func checkExcerpt(t *testing.T, path string, lines []string) {
	t.Helper()
	data, err := os.ReadFile(filepath.FromSlash(path))
	if err != nil {
		t.Errorf("README.md: %v", err)
		return
	}
	var file []string
	for _, l := range strings.Split(string(data), "\n") {
		file = append(file, strings.TrimSpace(l))
	}
	for i := 0; i+len(lines) <= len(file); i++ {
		if slices.Equal(file[i:i+len(lines)], lines) {
			return
		}
	}
	t.Errorf("README.md: the block from %s is not in it:\n%s", path, strings.Join(lines, "\n"))
}
