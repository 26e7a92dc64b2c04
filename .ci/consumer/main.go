// Command consumer proves that a module outside this repository can use
// certmgr, etcdcache and certmgrprom at the versions the nested go.mod
// files name, as a user will once they are tagged (RELEASING.md). It
// builds a module proxy in a directory (GOPROXY=file://...) from the
// working tree: for the root module, etcdcache and certmgrprom, at the
// version the nested go.mod files require of the root, a .info, a .mod
// and a .zip each, without the nested modules' files. Then, in a scratch
// module outside the tree, with that proxy ahead of the usual one for
// third-party modules, it gets etcdcache and certmgrprom at that version,
// builds the example servers' main.go files copied into it, and runs a
// program that obtains a certificate from certmgrtest's CA on two replicas
// sharing an etcd (etcdtest). Run from the repository's root:
//
//	go run .ci/consumer/main.go
//
// It needs the go command, and the module proxy this machine uses for
// third-party modules; nothing else. Standard library only.
package main

import (
	"archive/zip"
	"bufio"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

const root = "github.com/certmgr/certmgr"

// copied are the files a user copies into their own module, by the
// directory of the scratch module they go to: the deployable servers'
// main.go, which must build there as they are.
var copied = map[string]string{
	"cmd/server":     "examples/server/main.go",
	"cmd/etcdserver": "etcdcache/examples/server/main.go",
	"cmd/promserver": "certmgrprom/examples/server/main.go",
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "consumer:", err)
		os.Exit(1)
	}
}

func run() error {
	start := time.Now()
	version, err := requiredRoot("etcdcache/go.mod")
	if err != nil {
		return err
	}
	if strings.HasPrefix(version, "v0.0.0-") {
		return fmt.Errorf("etcdcache/go.mod requires %s %s, a pseudo-version no consumer can resolve: require the version to be tagged (RELEASING.md)", root, version)
	}
	// The published nested modules are tagged on the same commit as the
	// root, at the same version (RELEASING.md).
	if v, err := requiredRoot("certmgrprom/go.mod"); err != nil {
		return err
	} else if v != version {
		return fmt.Errorf("certmgrprom/go.mod requires %s %s, etcdcache/go.mod %s: they are released together", root, v, version)
	}
	tmp, err := os.MkdirTemp("", "certmgr-consumer-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	proxy := filepath.Join(tmp, "proxy")
	for _, m := range []struct{ path, dir string }{{root, "."}, {root + "/etcdcache", "etcdcache"}, {root + "/certmgrprom", "certmgrprom"}} {
		if err := addModule(proxy, m.path, m.dir, version); err != nil {
			return err
		}
	}

	scratch := filepath.Join(tmp, "scratch")
	if err := os.MkdirAll(scratch, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(scratch, "go.mod"), []byte("module example.com/consumer\n\ngo 1.26.0\n"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(scratch, "main.go"), []byte(program), 0o644); err != nil {
		return err
	}
	// The example servers' one files, copied as a user would.
	for dir, from := range copied {
		if err := os.MkdirAll(filepath.Join(scratch, dir), 0o755); err != nil {
			return err
		}
		src, err := os.ReadFile(from)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(scratch, dir, "main.go"), src, 0o644); err != nil {
			return err
		}
	}
	upstream, err := goEnv("GOPROXY")
	if err != nil {
		return err
	}
	modCache, err := goEnv("GOMODCACHE")
	if err != nil {
		return err
	}
	env := append(os.Environ(),
		"GOWORK=off", "GOFLAGS=-mod=mod -modcacherw -trimpath",
		// A module cache of its own: the machine's may hold an older
		// build of the same version, which Go would use instead of the
		// tree's. The machine's cache is a proxy too (its cache/download),
		// after the tree's, for third-party modules; -trimpath keeps the
		// build cache's entries valid from one module cache to the next.
		"GOMODCACHE="+filepath.Join(tmp, "modcache"),
		"GOPROXY=file://"+filepath.ToSlash(proxy)+",file://"+filepath.ToSlash(filepath.Join(modCache, "cache", "download"))+","+upstream,
		// The tree's modules are in no checksum database: go.sum records
		// what the proxy served (GOPRIVATE would bypass the proxy).
		"GONOSUMDB="+root, "GOSUMDB=off",
	)
	for _, args := range [][]string{
		{"get", root + "/etcdcache@" + version, root + "/certmgrprom@" + version},
		{"mod", "tidy"},
		{"build", "./cmd/..."},
		{"run", "."},
	} {
		cmd := exec.Command("go", args...)
		cmd.Dir, cmd.Env = scratch, env
		out, err := cmd.CombinedOutput()
		fmt.Printf("$ go %s\n%s", strings.Join(args, " "), out)
		if err != nil {
			return fmt.Errorf("go %s: %w", strings.Join(args, " "), err)
		}
	}
	fmt.Printf("consumer: %s, etcdcache and certmgrprom %s resolved from the module proxy built from the tree, in %v\n",
		root, version, time.Since(start).Round(time.Second))
	return nil
}

// requiredRoot returns the version of the root module that the go.mod
// file at path requires.
func requiredRoot(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	m := regexp.MustCompile(`(?m)^\s*(?:require\s+)?` + regexp.QuoteMeta(root) + `\s+(v\S+)`).FindSubmatch(data)
	if m == nil {
		return "", fmt.Errorf("%s does not require %s", path, root)
	}
	return string(m[1]), nil
}

// addModule writes to the proxy directory the module path at version,
// from the directory dir of the tree: its list, .info, .mod and .zip.
// The zip holds dir's files, but those of nested modules (a directory
// with a go.mod of its own), of hidden directories and hidden files.
func addModule(proxy, path, dir, version string) error {
	at := filepath.Join(proxy, filepath.FromSlash(path), "@v")
	if err := os.MkdirAll(at, 0o755); err != nil {
		return err
	}
	mod, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil {
		return err
	}
	files := map[string]string{
		"list":            version + "\n",
		version + ".info": fmt.Sprintf(`{"Version":%q,"Time":%q}`+"\n", version, time.Now().UTC().Format(time.RFC3339)),
		version + ".mod":  string(mod),
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(at, name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	f, err := os.Create(filepath.Join(at, version+".zip"))
	if err != nil {
		return err
	}
	defer f.Close()
	w := zip.NewWriter(bufio.NewWriter(f))
	prefix := path + "@" + version + "/"
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		name := d.Name()
		if d.IsDir() {
			if rel != "." && (strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_")) {
				return filepath.SkipDir
			}
			if rel != "." {
				if _, err := os.Stat(filepath.Join(p, "go.mod")); err == nil {
					return filepath.SkipDir // a nested module
				}
			}
			return nil
		}
		if strings.HasPrefix(name, ".") || !d.Type().IsRegular() {
			return nil
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		zw, err := w.Create(prefix + filepath.ToSlash(rel))
		if err != nil {
			return err
		}
		_, err = zw.Write(data)
		return err
	})
	if err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	return nil
}

func goEnv(name string) (string, error) {
	out, err := exec.Command("go", "env", name).Output()
	return strings.TrimSpace(string(out)), err
}

// program is the consumer: two replicas on one etcd obtain a certificate
// from the test CA, as the README shows.
const program = `package main

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/certmgr/certmgr"
	"github.com/certmgr/certmgr/certmgrtest"
	"github.com/certmgr/certmgr/etcdcache"
	"github.com/certmgr/certmgr/etcdcache/etcdtest"
)

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ca, err := certmgrtest.NewServer(certmgrtest.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer ca.Close()
	etcd, err := etcdtest.NewServer()
	if err != nil {
		log.Fatal(err)
	}
	defer etcd.Close()
	client, err := etcd.Client()
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	var ms []*certmgr.Manager
	for range 2 {
		cache, err := etcdcache.New(client, etcdcache.Options{Prefix: "/certmgr/"})
		if err != nil {
			log.Fatal(err)
		}
		defer cache.Close()
		am := ca.Autocert("www.example.test")
		am.Cache = cache
		m, err := certmgr.New(certmgr.Config{Autocert: am})
		if err != nil {
			log.Fatal(err)
		}
		defer m.Close()
		ms = append(ms, m)
	}
	ca.ServeTLS(ms[0].TLSConfig(), nil)
	if err := ms[1].Provision(ctx, "www.example.test"); err != nil {
		log.Fatal(err)
	}
	cs, err := ca.Handshake(ctx, "www.example.test")
	if err != nil {
		log.Fatal(err)
	}
	if st := ms[1].Status("www.example.test"); !st.NotAfter.Equal(cs.PeerCertificates[0].NotAfter) {
		log.Fatalf("replica 1: %+v; replica 0 serves a certificate expiring at %v", st, cs.PeerCertificates[0].NotAfter)
	}
	fmt.Println("two replicas serve", cs.PeerCertificates[0].DNSNames, "until", cs.PeerCertificates[0].NotAfter.UTC().Format(time.RFC3339))
}
`
