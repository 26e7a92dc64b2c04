package demoserver

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/crypto/acme/autocert"
)

// stagingDirectory is Let's Encrypt's staging CA.
const stagingDirectory = "https://acme-staging-v02.api.letsencrypt.org/directory"

// etcdFlags are the flags of a build with etcd support only.
var etcdFlags = []string{"etcd", "etcd-prefix", "demo", "demo-file"}

// errNoEtcd refuses the etcd flags in a build without etcd's client.
var errNoEtcd = errors.New("this build has no etcd support: run (cd etcdcache && go run ./examples/server -etcd ...) instead")

// Options are the server's command-line flags, as examples/server
// documents them.
type Options struct {
	Domains      []string     // -domain; with -pebble, the demo names if none; with -demo, the demo's (set by Open)
	KnownIPs     []netip.Addr // -known-ip; with -pebble, 127.0.0.1 if none; with -demo, 127.0.0.1 (set by Open)
	CacheDir     string       // -cache-dir; empty with -pebble, -demo or -etcd
	Email        string       // -email
	Profile      string       // -profile
	Directory    string       // -directory, or Let's Encrypt's production CA with -production
	HTTPSAddr    string       // -https-addr
	HTTPAddr     string       // -http-addr
	Status       bool         // -status
	StatusPublic bool         // -status-public
	Pebble       bool         // -pebble
	RootOut      string       // -pebble-root-out

	// In a build with etcd support only:
	Etcd       []string // -etcd, split at commas; with -demo, the demo's etcd (set by Open)
	EtcdPrefix string   // -etcd-prefix
	Demo       int      // -demo: this replica's number, from 1; 0 without -demo
	DemoFile   string   // -demo-file
}

// DefaultDemoFile is where StartDemo writes, and -demo reads, the
// description of a shared demo, unless told otherwise: certmgr-demo.json
// in the user's cache directory (os.UserCacheDir), which other users
// cannot write; or "" if there is none (no home directory), when the file
// must be named.
func DefaultDemoFile() string {
	dir, err := os.UserCacheDir()
	if err != nil {
		return ""
	}
	return filepath.Join(dir, "certmgr-demo.json")
}

// Parse parses the command line args (without the program name) of a
// build of the server; etcd reports whether the build has etcd's client
// (the flags -etcd, -etcd-prefix, -demo and -demo-file). If args are not
// usable, Parse explains why on stderr and returns nil and the exit
// status: 0 after -help, 2 otherwise; else it returns the Options and 0.
// A build without etcd refuses the etcd flags with a line naming the build
// that has them.
func Parse(args []string, stderr io.Writer, etcd bool) (*Options, int) {
	o := &Options{}
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Func("domain", "a domain to serve (repeatable)", func(s string) error {
		o.Domains = append(o.Domains, s)
		return nil
	})
	fs.Func("known-ip", "an address this server answers on; domains must resolve only to these (repeatable; default: no DNS check)", func(s string) error {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return errors.New("not an IP address")
		}
		o.KnownIPs = append(o.KnownIPs, a.Unmap())
		return nil
	})
	fs.StringVar(&o.CacheDir, "cache-dir", "", "directory keeping certificates and the account key (required, but with -pebble, -etcd or -demo)")
	fs.StringVar(&o.Email, "email", "", "contact address given to the CA")
	fs.StringVar(&o.Profile, "profile", "", `the ACME certificate profile every order asks for (Let's Encrypt: "classic", "tlsserver", "shortlived"); the CA's default if empty`)
	fs.StringVar(&o.Directory, "directory", stagingDirectory, "ACME directory URL")
	production := fs.Bool("production", false, "use Let's Encrypt's production CA ("+autocert.DefaultACMEDirectory+")")
	fs.StringVar(&o.HTTPSAddr, "https-addr", ":443", "HTTPS listen address")
	fs.StringVar(&o.HTTPAddr, "http-addr", ":80", "HTTP listen address (HTTP-01 and redirects)")
	fs.BoolVar(&o.Status, "status", true, "serve the status page at "+StatusPath)
	fs.BoolVar(&o.StatusPublic, "status-public", false, "serve the status page to every client, not only to loopback ones (told by the remote address: behind a proxy on the same host, every client is on loopback)")
	fs.BoolVar(&o.Pebble, "pebble", false, "run against an embedded Pebble CA on loopback")
	fs.StringVar(&o.RootOut, "pebble-root-out", "", "with -pebble, write Pebble's root certificate to this PEM file")
	var etcdList string
	if etcd {
		fs.StringVar(&etcdList, "etcd", "", "etcd client endpoints, comma-separated (e.g. http://127.0.0.1:2379): keep certificates in etcd, instead of -cache-dir, for replicas to share")
		fs.StringVar(&o.EtcdPrefix, "etcd-prefix", "/certmgr/", "with -etcd, the prefix of every etcd key the server uses")
		fs.IntVar(&o.Demo, "demo", 0, "run as replica `N` (from 1) of the shared demo that examples/demoenv runs: its etcd, CA and names")
		fs.StringVar(&o.DemoFile, "demo-file", DefaultDemoFile(), "with -demo, the file describing the shared demo")
	} else {
		// So that a command line for the etcd build is told where to go
		// rather than of an unknown flag.
		for _, name := range etcdFlags {
			fs.String(name, "", "not in this build: see the etcdcache module's examples/server")
		}
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, 0
		}
		return nil, 2
	}
	set := make(map[string]bool)
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if !etcd {
		for _, name := range etcdFlags {
			if set[name] {
				return fail(stderr, errNoEtcd.Error())
			}
		}
	}
	if fs.NArg() > 0 {
		return fail(stderr, "unexpected arguments: "+strings.Join(fs.Args(), " "))
	}
	if set["etcd"] {
		for e := range strings.SplitSeq(etcdList, ",") {
			if e = strings.TrimSpace(e); e == "" {
				return fail(stderr, fmt.Sprintf("-etcd %q: an empty endpoint", etcdList))
			}
			o.Etcd = append(o.Etcd, e)
		}
		if set["cache-dir"] {
			return fail(stderr, "-etcd and -cache-dir do not go together")
		}
		if o.EtcdPrefix == "" {
			return fail(stderr, "-etcd-prefix must not be empty")
		}
	} else if set["etcd-prefix"] && !set["demo"] { // -demo refuses it below
		return fail(stderr, "-etcd-prefix needs -etcd")
	}
	if set["demo-file"] && !set["demo"] {
		return fail(stderr, "-demo-file needs -demo")
	}
	// The flags the embedded or shared demo sets itself.
	own := []string{"cache-dir", "directory", "production", "https-addr", "http-addr"}
	switch {
	case set["demo"]:
		if o.Demo < 1 {
			return fail(stderr, "-demo: replicas are numbered from 1")
		}
		// The demo's names, addresses and etcd keys are the same for
		// every replica.
		for _, name := range append(own, "pebble", "pebble-root-out", "etcd", "etcd-prefix", "domain", "known-ip") {
			if set[name] {
				return fail(stderr, "-"+name+" does not go with -demo")
			}
		}
		if o.DemoFile == "" {
			return fail(stderr, "-demo needs -demo-file: there is no user cache directory for the default")
		}
	case o.Pebble:
		for _, name := range own {
			if set[name] {
				return fail(stderr, "-"+name+" does not go with -pebble")
			}
		}
		if len(o.Domains) == 0 {
			o.Domains = DemoDomains()
		}
		if len(o.KnownIPs) == 0 {
			o.KnownIPs = []netip.Addr{netip.MustParseAddr("127.0.0.1")}
		}
	case set["pebble-root-out"]:
		return fail(stderr, "-pebble-root-out needs -pebble")
	case len(o.Domains) == 0:
		return fail(stderr, "no -domain given")
	case o.CacheDir == "" && len(o.Etcd) == 0:
		return fail(stderr, "-cache-dir is required: certificates must survive restarts")
	case *production && set["directory"]:
		return fail(stderr, "-production and -directory do not go together")
	}
	if *production {
		o.Directory = autocert.DefaultACMEDirectory
	}
	return o, 0
}

// fail prints msg after "server: " and returns exit status 2.
func fail(stderr io.Writer, msg string) (*Options, int) {
	fmt.Fprintln(stderr, "server:", msg)
	return nil, 2
}

// Private returns h, served only to clients on loopback addresses unless
// -status-public was given: the status page and metrics name domains,
// addresses and errors.
func (o *Options) Private(h http.Handler) http.Handler {
	if o.StatusPublic {
		return h
	}
	return loopbackOnly(h)
}

// DemoDomains returns the names the embedded and shared demos serve by
// default. They exist only in the demos' DNS servers.
func DemoDomains() []string {
	return []string{"a.pebble.test", "b.pebble.test"}
}
