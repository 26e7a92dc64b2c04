package leakcheck

import (
	"strings"
	"testing"
	"time"
)

// TestLabelledSeesItsOwnGoroutines: the goroutines a labelled goroutine
// starts, and those they start, are listed under its label; others are
// not.
func TestLabelledSeesItsOwnGoroutines(t *testing.T) {
	stop := make(chan struct{})
	defer close(stop)
	started := make(chan struct{}, 3)
	go func() { started <- struct{}{}; <-stop }() // before the label
	Label("test", t.Name())
	go func() {
		go func() { started <- struct{}{}; <-stop }()
		started <- struct{}{}
		<-stop
	}()
	for range 3 {
		<-started
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := Labelled("test", t.Name())
		ours := 0
		for _, s := range got {
			if strings.Contains(s, "TestLabelledSeesItsOwnGoroutines.func2") {
				ours++
			}
		}
		if ours == 2 && len(got) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Labelled listed %d goroutines (%d of ours), want the 2 started after the label:\n%s",
				len(got), ours, strings.Join(got, "\n\n"))
		}
		time.Sleep(5 * time.Millisecond) // polling with a deadline
	}
	if got := Labelled("test", "another"); len(got) != 0 {
		t.Errorf("another label lists %d goroutines", len(got))
	}
}
