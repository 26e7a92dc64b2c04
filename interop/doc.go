// Package interop runs certmgr against ACME servers other than the
// Pebble that the root module's tests embed. Its tests build step-ca
// (Smallstep's ACME server, at the version the stepca module pins) and
// run certmgr against it over loopback: issuance, the failures step-ca
// reports its own way, a restart and a burst of new names.
//
// Run them from this directory with
//
//	GOWORK=off go test -race ./...
//
// The first run downloads and builds step-ca (about 160 modules).
package interop
