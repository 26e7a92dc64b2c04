package certmgrtest

import (
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/certmgr/certmgr/internal/leakcheck"
)

// TestBalancerRoundRobin: connections go to each backend in turn, each
// one's bytes both ways, and Close leaves no goroutine of the balancer.
func TestBalancerRoundRobin(t *testing.T) {
	var addrs []string
	for _, id := range []string{"a", "b", "c"} {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				go func() { // answers its id, then echoes what it read
					defer c.Close()
					io.WriteString(c, id)
					io.Copy(c, c)
				}()
			}
		}()
		addrs = append(addrs, l.Addr().String())
	}
	front, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := NewBalancer(front, addrs...)
	var got []string
	for range 6 {
		c, err := net.Dial("tcp", front.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "!")
		c.(*net.TCPConn).CloseWrite()
		reply, err := io.ReadAll(c)
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, string(reply))
	}
	if want := []string{"a!", "b!", "c!", "a!", "b!", "c!"}; !slices.Equal(got, want) {
		t.Errorf("replies %q, want %q", got, want)
	}
	if n := b.Conns(); !slices.Equal(n, []int{2, 2, 2}) {
		t.Errorf("Conns() = %v, want [2 2 2]", n)
	}
	// A backend that is down gets no connection until it is up again.
	b.SetDown(1, true)
	for range 4 {
		c, err := net.Dial("tcp", front.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.ReadFull(c, make([]byte, 1))
		c.Close()
	}
	b.SetDown(1, false)
	if n := b.Conns(); !slices.Equal(n, []int{4, 2, 4}) {
		t.Errorf("Conns() = %v after 4 connections with the second backend down, want [4 2 4]", n)
	}
	// A connection still open at Close is closed.
	open, err := net.Dial("tcp", front.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	open.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(open, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(open); err != nil {
		t.Fatalf("reading a connection the balancer closed: %v", err)
	}
	for _, s := range leakcheck.Stacks() {
		if strings.Contains(s, "certmgrtest.(*Balancer)") {
			t.Errorf("a goroutine of the balancer is left after Close:\n%s", s)
		}
	}
}
