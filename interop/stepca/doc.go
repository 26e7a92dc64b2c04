// Package stepca pins the version of step-ca (Smallstep's ACME server,
// github.com/smallstep/certificates) that certmgr's interoperability
// tests build and run. It is a module of its own so that step-ca builds
// with its own dependency versions, whatever certmgr requires; the tests
// in the parent directory build it with
//
//	go build -o step-ca github.com/smallstep/certificates/cmd/step-ca
//
// run from this directory, with GOWORK=off.
package stepca
