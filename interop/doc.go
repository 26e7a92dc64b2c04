// Package interop runs certmgr against ACME servers other than the
// Pebble that the root module's tests embed. Its tests build step-ca
// (Smallstep's ACME server, at the version the stepca module pins) and
// run certmgr against it over loopback: issuance, the failures step-ca
// reports its own way, a restart and a burst of new names.
//
// The README's test command runs them, with every other module's; alone,
// from this directory:
//
//	go test -race ./...
//
// The first run downloads and builds step-ca (about 160 modules), in the
// stepca module, which stays outside the workspace so that step-ca keeps
// its own dependency versions.
package interop
