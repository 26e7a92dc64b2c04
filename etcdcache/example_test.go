package etcdcache_test

import (
	"log"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/crypto/acme/autocert"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/etcdcache"
)

// Replicas share one etcd through a Cache each: the README's snippet.
// (Compiled, not run: it needs an etcd.)
func Example() {
	endpoints := []string{"127.0.0.1:2379"}
	policy := autocert.HostWhitelist("example.com")
	client, err := clientv3.New(clientv3.Config{Endpoints: endpoints}) // yours: close it after the Cache
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	cache, err := etcdcache.New(client, etcdcache.Options{Prefix: "/certmgr/", LeaseTTL: 15 * time.Second})
	if err != nil {
		log.Fatal(err)
	}
	defer cache.Close() // after the Manager's Close: releases its locks and its lease
	m, err := certmgr.New(certmgr.Config{Autocert: &autocert.Manager{Cache: cache, HostPolicy: policy}})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
}
