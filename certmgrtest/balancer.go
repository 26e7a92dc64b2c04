package certmgrtest

import (
	"errors"
	"io"
	"net"
	"sync"
)

// Balancer is a round-robin TCP load balancer: it hands each connection it
// accepts to the next of its backends in turn, as a load balancer in front
// of replicas would, so that the CA's validation connections reach
// replicas that did not order. Put it on a Server's TLSListener or
// HTTPListener instead of calling ServeTLS or ServePlain:
//
//	b := certmgrtest.NewBalancer(srv.TLSListener, replicaAddrs...)
//	defer b.Close()
type Balancer struct {
	ln       net.Listener
	backends []string

	mu     sync.Mutex // guards next, counts, down, conns and closed
	next   int
	counts []int
	down   []bool
	conns  map[net.Conn]bool
	closed bool

	wg sync.WaitGroup
}

// NewBalancer serves ln in the background, forwarding each connection to
// a backend address, in turn, until Close. A connection whose backend
// refuses it is closed: the balancer does not retry another one.
func NewBalancer(ln net.Listener, backends ...string) *Balancer {
	b := &Balancer{ln: ln, backends: backends, counts: make([]int, len(backends)), down: make([]bool, len(backends)),
		conns: make(map[net.Conn]bool)}
	b.wg.Go(b.serve)
	return b
}

// Conns returns how many connections were handed to each backend, in the
// order NewBalancer was given them.
func (b *Balancer) Conns() []int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]int(nil), b.counts...)
}

// SetDown takes backend i (in the order NewBalancer was given them) out of
// the rotation, or puts it back, as a load balancer's health check would
// when a replica crashes or recovers. Its open connections stay open.
// With every backend down, connections are closed at once.
func (b *Balancer) SetDown(i int, down bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.down[i] = down
}

// pickLocked returns the next backend up, or -1.
func (b *Balancer) pickLocked() int {
	for range b.backends {
		i := b.next
		b.next = (b.next + 1) % len(b.backends)
		if !b.down[i] {
			return i
		}
	}
	return -1
}

// Close closes the listener and every connection, and waits for the
// balancer's goroutines.
func (b *Balancer) Close() error {
	err := b.ln.Close()
	b.mu.Lock()
	b.closed = true
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil // the Server closed it first
	}
	return err
}

func (b *Balancer) serve() {
	for {
		in, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.mu.Lock()
		i := b.pickLocked()
		if i < 0 || b.closed {
			b.mu.Unlock()
			in.Close()
			continue
		}
		b.counts[i]++
		b.conns[in] = true
		b.mu.Unlock()
		b.wg.Go(func() { b.forward(in, b.backends[i]) })
	}
}

// track adds c to the connections Close closes, unless Close ran.
func (b *Balancer) track(c net.Conn) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		c.Close()
		return false
	}
	b.conns[c] = true
	return true
}

func (b *Balancer) untrack(cs ...net.Conn) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, c := range cs {
		delete(b.conns, c)
		c.Close()
	}
}

func (b *Balancer) forward(in net.Conn, backend string) {
	out, err := net.Dial("tcp", backend)
	if err != nil {
		b.untrack(in)
		return
	}
	if !b.track(out) {
		b.untrack(in)
		return
	}
	var wg sync.WaitGroup
	wg.Go(func() { io.Copy(out, in); closeWrite(out) })
	wg.Go(func() { io.Copy(in, out); closeWrite(in) })
	wg.Wait()
	b.untrack(in, out)
}

// closeWrite half-closes c when it can, so that the other side sees the
// end of the stream while it may still answer; otherwise it closes c.
func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		return
	}
	c.Close()
}
