// Package etcdtest runs an etcd server in a test's process, on loopback,
// for the tests of servers whose certmgr replicas share etcd through
// etcdcache. In one call:
//
//	client := etcdtest.Start(t) // a client of a fresh etcd, both closed at the test's end
//
// Its core, NewServer, does not need a test.
package etcdtest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Server is a one-member etcd server in this process, on a loopback
// address of its own, with its data in a directory of its own.
type Server struct {
	// Endpoint is the URL of its client endpoint.
	Endpoint string

	e   *embed.Etcd
	dir string
}

// NewServer starts an etcd server, with its data in a new temporary
// directory, and waits until it serves. Close stops it and removes the
// directory. Its ports were free a moment before it binds them; if a
// listener elsewhere took one meanwhile, it tries other addresses.
func NewServer() (*Server, error) {
	for try := 1; ; try++ {
		s, err := newServer()
		if err != nil && strings.Contains(err.Error(), "address already in use") && try < 5 {
			continue
		}
		return s, err
	}
}

func newServer() (*Server, error) {
	dir, err := os.MkdirTemp("", "etcdtest-")
	if err != nil {
		return nil, fmt.Errorf("etcdtest: %w", err)
	}
	cfg := embed.NewConfig()
	cfg.Name = "etcdtest"
	cfg.Dir = dir
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.UnsafeNoFsync = true
	// An address of 127.0.0.0/8 of its own: its ports are not taken by
	// the listeners others open on 127.0.0.1.
	host := fmt.Sprintf("127.%d.%d.%d", 1+rand.IntN(254), rand.IntN(256), 1+rand.IntN(254))
	ports, err := freePorts(host, 2)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	cu := url.URL{Scheme: "http", Host: net.JoinHostPort(host, ports[0])}
	pu := url.URL{Scheme: "http", Host: net.JoinHostPort(host, ports[1])}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
	cfg.InitialCluster = cfg.Name + "=" + pu.String()
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("etcdtest: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Close()
		os.RemoveAll(dir)
		return nil, fmt.Errorf("etcdtest: etcd not ready within 30 s")
	}
	return &Server{Endpoint: cu.String(), e: e, dir: dir}, nil
}

// freePorts returns n distinct ports free on host a moment ago.
func freePorts(host string, n int) ([]string, error) {
	var ports []string
	for range n {
		l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			return nil, fmt.Errorf("etcdtest: %w", err)
		}
		defer l.Close() // all open at once: distinct
		_, port, _ := net.SplitHostPort(l.Addr().String())
		ports = append(ports, port)
	}
	return ports, nil
}

// Client returns a new client of s; the caller closes it.
func (s *Server) Client() (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{Endpoints: []string{s.Endpoint}, DialTimeout: 5 * time.Second,
		Logger: zap.NewNop()})
}

// Close stops s and removes its data.
func (s *Server) Close() error {
	s.e.Close()
	return os.RemoveAll(s.dir)
}

// TB is the part of testing.TB that Start uses.
type TB interface {
	Helper()
	Fatal(args ...any)
	Cleanup(func())
}

// Start is NewServer for tests: it returns a client of a fresh etcd
// server, and closes both at tb's end (the client first). It fails tb if
// either cannot start.
func Start(tb TB) *clientv3.Client {
	tb.Helper()
	s, err := NewServer()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	c, err := s.Client()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Get(ctx, "etcdtest"); err != nil {
		tb.Fatal(fmt.Errorf("etcdtest: the client cannot reach the server: %w", err))
	}
	return c
}
