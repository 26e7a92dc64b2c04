// Package etcdtest runs etcd servers in the tests' process, for the tests
// of the etcdcache module's packages.
package etcdtest

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Server is a one-member etcd server in this process, on loopback.
type Server struct {
	cfg *embed.Config
	mu  sync.Mutex // guards e
	e   *embed.Etcd
}

// freeURL returns an http URL on a port of the loopback address host
// that is free now.
func freeURL(t testing.TB, host string) url.URL {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return url.URL{Scheme: "http", Host: l.Addr().String()}
}

// FreeURL returns an http URL on a free port of an address of
// 127.0.0.0/8 of its own (see loopbackHost), for an etcd member that
// is stopped and started again on it.
func FreeURL(t testing.TB) url.URL {
	t.Helper()
	return freeURL(t, loopbackHost())
}

// loopbackHost returns a random address of 127.0.0.0/8 other than
// 127.0.0.1, for one server: its ports, free again while it is stopped,
// are not taken meanwhile by the listeners other tests open on
// 127.0.0.1, so that it starts again on them.
func loopbackHost() string {
	return fmt.Sprintf("127.%d.%d.%d", 1+rand.IntN(254), rand.IntN(256), 1+rand.IntN(254))
}

// Start starts an etcd server with its data in a temporary directory,
// and stops it in t's cleanup. Its ports were free a moment before it
// binds them, and a listener elsewhere on the machine (one on every
// address) may take one meanwhile: then it tries other addresses.
func Start(t testing.TB) *Server {
	t.Helper()
	for try := 1; ; try++ {
		cfg := embed.NewConfig()
		cfg.Name = "test"
		cfg.Dir = t.TempDir()
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		cfg.UnsafeNoFsync = true
		host := loopbackHost()
		cu, pu := freeURL(t, host), freeURL(t, host)
		for pu.Host == cu.Host {
			// The port just closed may be handed out again at once: the
			// client and peer listeners would then collide.
			pu = freeURL(t, host)
		}
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
		cfg.InitialCluster = cfg.Name + "=" + pu.String()
		s := &Server{cfg: cfg}
		err := s.start()
		if err != nil && (errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use")) && try < 5 {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Stop)
		return s
	}
}

// Start starts s again, on the same addresses and data, after Stop.
func (s *Server) Start(t testing.TB) {
	t.Helper()
	if err := s.start(); err != nil {
		t.Fatal(err)
	}
}

// start starts s and waits until it serves.
func (s *Server) start() error {
	e, err := embed.StartEtcd(s.cfg)
	if err != nil {
		return err
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Close()
		return errors.New("etcd not ready within 30s")
	}
	s.mu.Lock()
	s.e = e
	s.mu.Unlock()
	return nil
}

// Stop stops s, if it runs.
func (s *Server) Stop() {
	s.mu.Lock()
	e := s.e
	s.e = nil
	s.mu.Unlock()
	if e != nil {
		e.Close()
	}
}

// Endpoint returns the URL of s's client endpoint.
func (s *Server) Endpoint() string { return s.cfg.AdvertiseClientUrls[0].String() }

// Host returns the host and port of s's client endpoint.
func (s *Server) Host() string { return s.cfg.AdvertiseClientUrls[0].Host }
