// Package demoserver is the plumbing of the command examples/server and
// of its builds in the etcdcache and certmgrprom modules, whose
// documentation describes the flags and behaviour: the command line
// (Parse), where the server runs (Open: a real CA and listeners, the
// embedded Pebble CA of -pebble, or the shared demo of -demo), serving and
// graceful shutdown (Env.Serve), provisioning at start (Provision) and the
// status page (StatusPage).
//
// It makes no certmgr call: each server's main.go does, in its serve
// function, which is meant to be copied into a user's own server:
// certmgr.New with the flags' Config, TLSConfig on the HTTPS listener,
// HTTPHandler on the HTTP one, Provision of the domains, StatusHandler
// behind the status page, and Close.
//
// A shared demo (StartDemo, run by etcdcache's examples/demoenv) is one
// Pebble CA with its DNS server and one etcd for replicas of the server
// in processes of their own, each started with -demo N: the CA validates
// through a load balancer that hands each connection to the next replica
// that accepts it.
package demoserver
