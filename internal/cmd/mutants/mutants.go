package main

// mutants is the list the check runs, each with the tests that must fail
// with it. The source to replace must occur exactly once in its file.
var mutants = []mutant{
	// The cluster: fencing and the lock.
	{
		name: "record write without the fence",
		file: "cluster.go",
		old:  `newRev, ok, err = m.coord.PutIf(ctx, key, out, rev, fence)`,
		new:  `newRev, ok, err = m.coord.PutIf(ctx, key, out, rev, "")`,
		pkg:  ".", tests: "^TestRecordWriteOfALostHoldDoesNotLand$",
	},
	{
		name: "record write after the hold was lost",
		file: "cluster.go",
		old: `	for range maxRecordRetries {
		if closed(lost) {
			return errLockLost
		}`,
		new: `	for range maxRecordRetries {`,
		pkg: ".", tests: "^TestRecordWriteOfALostHoldDoesNotLand$",
	},
	{
		name: "token written without holding the lock",
		file: "cluster.go",
		old: `	return m.holdsLock(name)
}`,
		new: `	return true
}`,
		pkg: ".", tests: "^TestTokenWrittenOnlyUnderTheLock$",
	},
	{
		name: "etcd lock: any entry counts as held",
		file: "etcdcache/lock.go",
		old:  `if first := resp.Responses[1].GetResponseRange().Kvs; len(first) > 0 && first[0].CreateRevision == rev {`,
		new:  `if first := resp.Responses[1].GetResponseRange().Kvs; len(first) > 0 {`,
		pkg:  "./etcdcache", tests: "^TestBurstMakesOneOrder$",
	},
	{
		name: "etcd write without the lock owner's comparison",
		file: "etcdcache/etcdcache.go",
		old:  `return append(cmps, h.owner()), true`,
		new:  `return cmps, true`,
		pkg:  "./etcdcache", tests: "^TestFenceInTxn$",
	},

	// The budget of failed authorizations.
	{
		name: "order admitted past the domain's budget",
		file: "admit.go",
		old: `	if t := d.fail.budgetFree(now, 1, m.cfg.AuthzBudget); t.After(now) {
		return fmt.Errorf("%w: %s: failed-authorization budget spent until %s", ErrBackoff, d.name, t.UTC().Format(time.RFC3339))
	}`,
		new: ``,
		pkg: ".", tests: "^TestOrdersInsideAnAttemptKeepTheBudget$",
	},
	{
		name: "order admitted past the cluster's budget",
		file: "admit.go",
		old:  `if t := r.budgetFree(now, 1, m.cfg.AuthzBudget); t.After(now) {`,
		new:  `if t := r.budgetFree(now, 1, m.cfg.AuthzBudget); false && t.After(now) {`,
		pkg:  ".", tests: "^TestClusterBudgetCheckedOnTheRecordWritten$",
	},
	{
		name: "no reservation before an order",
		file: "admit.go",
		old:  `			d.fail.reserve(now, id)`,
		new:  `			_ = id`,
		pkg:  ".", tests: "^TestGracefulRestartsSpendAtMostTheBudget$",
	},
	{
		name: "default AuthzBudget 5",
		file: "certmgr.go",
		old:  `m.cfg.AuthzBudget = cmp.Or(cfg.AuthzBudget, 4)`,
		new:  `m.cfg.AuthzBudget = cmp.Or(cfg.AuthzBudget, 5)`,
		pkg:  ".", tests: "^(TestScheduleKeepsBudget|TestReplicasKeepOneBudgetFor48Hours)$",
	},
	{
		name: "an order whose context ended reserves",
		file: "acme.go",
		old: `	if err := req.Context().Err(); err != nil {
		// autocert orders again after its context ended: an order that
		// cannot go out reserves nothing.
		return nil, err
	}`,
		new: ``,
		pkg: ".", tests: "^TestObserverReservesNothingForAnEndedRequest$",
	},

	// The CA's word.
	{
		name: "the CA's Retry-After not a floor",
		file: "record.go",
		old:  `	next = maxTime(next, f.RetryAfter)`,
		new:  `	next = maxTime(next, time.Time{})`,
		pkg:  ".", tests: "^(TestFailureRecordFail|TestRateLimitShowsInStatusAtOnce|TestRetryKeepsRetryAfter)$",
	},
	{
		name: "a pending authorization with an error never fails",
		file: "acme.go",
		old:  `if ob.erred && o.stalled(req.URL.String(), time.Now()) {`,
		new:  `if false && ob.erred && o.stalled(req.URL.String(), time.Now()) {`,
		pkg:  ".", tests: "^TestObserverFailsAPendingAuthorizationWithAnError$",
	},

	{
		name: "a challenge the client never accepted fails its authorization",
		file: "acme.go",
		old: `			if !o.isAccepted(c.URL) {
				continue
			}`,
		new: ``,
		pkg: ".", tests: "^TestObserverFailsAPendingAuthorizationWithAnError$",
	},

	// Handshakes.
	{
		name: "no handshake timeout",
		file: "handshake.go",
		old:  `return context.WithTimeoutCause(parent, m.timeout, errHandshakeTimeout)`,
		new:  `return context.WithCancel(parent)`,
		pkg:  ".", tests: "^TestCAThatLeavesAuthorizationsPending$",
	},

	// (answerNow's check of waitedOut is the fast path of this rule: a
	// mutant without it is equivalent but for speed.)
	{
		name: "a handshake of the same attempt waits again",
		file: "attempt.go",
		old:  `if path == PathHandshake && m.waitedOut(a) {`,
		new:  `if false && path == PathHandshake && m.waitedOut(a) {`,
		pkg:  ".", tests: "^TestCAThatLeavesAuthorizationsPending$",
	},

	// The DNS pre-check.
	{
		name: "no DNS pre-check",
		file: "attempt.go",
		old: `	if m.dns != nil {
		ctx, cancel := context.WithTimeout(m.ctx, m.hooks.dnsCheckTimeout)`,
		new: `	if false && m.dns != nil {
		ctx, cancel := context.WithTimeout(m.ctx, m.hooks.dnsCheckTimeout)`,
		pkg: ".", tests: "^TestPreCheckWaitsForDNS$",
	},

	// Renewals.
	{
		name: "renewal guard off",
		file: "renew.go",
		old:  `	if !renewedUntilLocked(d, now, 0).IsZero() {`,
		new:  `	if false {`,
		pkg:  ".", tests: "^TestRenewalGuard$",
	},
	{
		name: "RenewBefore unbounded",
		file: "renew.go",
		old:  `	if m.cfg.Autocert.RenewBefore <= 0 {`,
		new:  `	if true {`,
		pkg:  ".", tests: "^TestRenewBeforeBoundedToTwoThirdsOfTheLifetime$",
	},
	{
		name: "renewal-information poll without its lower bound",
		file: "ari.go",
		old:  `interval = min(max(interval, m.hooks.renewalInfoMinPoll), m.hooks.renewalInfoMaxPoll)`,
		new:  `interval = min(interval, m.hooks.renewalInfoMaxPoll)`,
		pkg:  ".", tests: "^TestRenewalInfoPollIntervals$",
	},
	{
		name: "renewal-information poll ignores the CA's Retry-After",
		file: "ari.go",
		old:  `	if retryAfter.After(now) {`,
		new:  `	if false && retryAfter.After(now) {`,
		pkg:  ".", tests: "^TestRenewalInfoPollIntervals$",
	},
	{
		name: "renewal-information polls at once when the CA is unreachable",
		file: "ari.go",
		old:  `ri.nextPoll = maxTime(ri.nextPoll, now.Add(m.hooks.renewalInfoMinPoll))`,
		new:  `ri.nextPoll = maxTime(ri.nextPoll, now)`,
		pkg:  ".", tests: "^TestRenewalInfoPollIntervals$",
	},

	// Profiles and replaces.
	{
		name: "a profile the CA does not offer is asked for",
		file: "acme.go",
		old:  `if dir := o.directoryInfo(); dir.read && !slices.Contains(dir.profiles, o.profile) {`,
		new:  `if dir := o.directoryInfo(); false && dir.read && !slices.Contains(dir.profiles, o.profile) {`,
		pkg:  ".", tests: "^TestUnknownProfileMakesNoOrder$",
	},
	{
		name: "an order replaces refused is not sent again",
		file: "acme.go",
		old:  `	if !refusesReplaces(res) {`,
		new:  `	if true || !refusesReplaces(res) {`,
		pkg:  ".", tests: "^TestRenewalNamesTheCertificateItReplaces$",
	},

	// Close.
	{
		name: "requests go out after Close",
		file: "acme.go",
		old: `	if o.mgr.isClosed() {
		return nil, errClosed
	}`,
		new: ``,
		pkg: ".", tests: "^TestObserverRoundTrip$",
	},
}
