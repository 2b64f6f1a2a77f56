/* ThreadTeam's job posting and SpinBarrier (threads.h, threads.cpp) as a Promela model for SPIN.
 * .ci/check_team_model.sh checks it; `spin -a -DOLD_PROTOCOL` builds the protocol the post word
 * replaced, which must fail.
 *
 * Processes. `caller` is the thread holding the lease (rank 0): it runs the calls of PLAN in order,
 * jobs and resizes alike, then stops the team as ~ThreadTeam does. Callers on several threads take
 * turns on lease_mutex_, whose unlock/lock orders each call after the last, so one process stands for
 * all of them. Each `worker` is one worker_loop thread (ranks 1..size-1); a resize joins them all and
 * starts new ones. Steps are named by the C++ statement they model (function: `statement`).
 *
 * Properties, checked over every interleaving:
 *   (a) each rank < threads starts each job exactly once, no rank >= threads starts it, and every one
 *       has started it by the time the caller sees pending_ == 0;
 *   (b) a rank reads job_ only while that job is live: job_ is not nullptr and the caller has not yet
 *       seen pending_ == 0 (after that run() may return and the job be destroyed); each rank's part
 *       also ends while the job is live, and pending_ never drops below 0;
 *   (c) no deadlock: the only end state is every process finished (SPIN's invalid end state check),
 *       and `ltl terminates` (<> finished) holds, so no run stalls or goes on forever;
 *   (d) no rank leaves the k-th barrier wait of a job before all the job's ranks have arrived there.
 *
 * Waits. A worker spins on post_ and then sleeps on wake_ with the predicate post_ != seen; both are
 * modelled as one blocking step that loads post_ once it differs from seen. That is exact for safety:
 * the spin loop and the predicate test load the same word, and the sleep loses no wake-up, because
 * post() changes post_ while holding sleep_mutex_, which the sleeper holds from its predicate test
 * until wait() has queued it, and notify_all comes after the change. The other spins (pending_ == 0,
 * phase_ != phase) are blocking guards for the same reason.
 *
 * Memory order. Promela runs the steps in one global order (sequential consistency). The C++ orders
 * every cross-thread handoff the model relies on: job_, barrier_.reset() and pending_ are written
 * before the release store of post_ that the worker's acquire load reads; a rank's job work precedes
 * its acq_rel fetch_sub of pending_, which the caller's acquire load of 0 reads (the release sequence
 * of all the decrements); stopping_ is a seq_cst store before post(0); the barrier's fetch_add is
 * acq_rel and its phase_ store/load release/acquire. Every other shared access is to a variable that
 * such a pair already orders, so no execution has an outcome the SC interleavings lack.
 *
 * Scope. keep_workers_off_caller_cpu, FlushDenormals and the fork handlers change no shared state the
 * protocol reads (a child's lost workers are restarted by start_workers, as in a resize). Job bodies
 * are NB barrier waits; the work between them touches no team state.
 *
 * State space (SPIN 6.5.2, PLAN below, NB = 2): the fixed protocol has 1,148,880 states (all
 * reached, depth 114); the OLD_PROTOCOL build fails assertion (a) or (b) within a few hundred states.
 */

/* The configuration checked; each can be overridden with -D (spin -a -DTEAM=5 ...). */
#ifndef TEAM
#define TEAM   4   /* team size at the start: rank 0 and workers 1..3 */
#endif
#ifndef NB
#define NB     2   /* barrier waits per job */
#endif
/* The calls in order: n > 0 runs a job on n ranks; -n resizes the team to n. It has a job smaller
 * than the team before a larger one (2 then 4, 2 then 3: what the old protocol gets wrong), a job on
 * one rank (no post), two jobs of the same size in a row, a shrink and a growth. */
#ifndef PLAN
#define NCALLS 12
#define PLAN   plan[0] = 2; plan[1] = 4; plan[2] = 4; plan[3] = 1; plan[4] = 3; plan[5] = 2; \
               plan[6] = -3; plan[7] = 2; plan[8] = 3; plan[9] = -4; plan[10] = 4; plan[11] = 2
#endif
hidden short plan[NCALLS];

/* Team state */
int   post;        /* post_: (generation << 16) | threads; threads 0 posts a stop */
byte  job_;        /* job_: number of the current job (1 + its index in plan), 0 = nullptr */
short pending;     /* pending_ */
bool  stopping;    /* stopping_ */
byte  parties;     /* barrier_.parties_ */
byte  arrived;     /* barrier_.arrived_ */
byte  phase;       /* barrier_.phase_ */
#ifdef OLD_PROTOCOL
byte  job_threads; /* job_threads_, a plain int beside the generation counter */
#define SEEN(w) ((w) >> 16)   /* the old worker compared and kept the generation alone */
#else
#define SEEN(w) (w)           /* the worker compares and keeps the whole word */
#endif

/* Ghost state, read only by assertions */
byte live;                      /* the job whose caller has not yet seen pending_ == 0 */
byte threads_of[NCALLS + 1];
byte ran[NCALLS + 1];           /* bit r: rank r has started job j */
byte came[(NCALLS + 1) * NB];   /* ranks of job j that have arrived at its k-th barrier wait */
byte workers;                   /* worker threads that have not returned (what join waits for) */
bool finished;

/* SpinBarrier::wait(), the k-th call of job j (locals ph, old of the calling process). */
inline barrier_wait(j, k) {
  if
  :: atomic { parties <= 1 -> came[j * NB + k]++ }     /* if (parties_ <= 1) return; */
  :: else ->
     ph = phase;                                        /* phase_.load(acquire) */
     d_step { old = arrived; arrived++; came[j * NB + k]++ }  /* arrived_.fetch_add(1, acq_rel) */
     if
     :: old == parties - 1 ->
        arrived = 0;                                    /* arrived_.store(0, relaxed) */
        phase = ph + 1                                  /* phase_.store(phase + 1, release) */
     :: else ->
        phase != ph                                     /* spin until phase_.load(acquire) != phase */
     fi
  fi;
  assert(came[j * NB + k] == threads_of[j])             /* (d) */
}

/* job(rank) for job j, the job read from job_ (locals k, ph, old). */
inline run_job(rank, j) {
  d_step {
    assert(j != 0 && j == live);                                    /* (b) */
    assert(rank < threads_of[j] && (ran[j] & (1 << rank)) == 0);    /* (a) */
    ran[j] = ran[j] | (1 << rank)
  }
  k = 0;
  do
  :: k < NB -> barrier_wait(j, k); k++
  :: else -> break
  od;
  assert(j == live)                                                 /* (b) */
}

proctype worker(byte rank; int seen) {
  byte j, k, ph, old;
  do
  :: /* worker_loop: `word = post_.load(acquire)` until `word != seen` (spin, then wake_.wait with
      * that predicate); `seen = word` */
     atomic { SEEN(post) != seen -> seen = SEEN(post) };
     if
     :: stopping -> break                          /* if (stopping_.load(acquire)) return; */
     :: else
     fi;
#ifndef OLD_PROTOCOL
     if
     :: rank < (seen & 65535) ->                   /* if (rank < post_threads(word)) */
#else
     if
     :: rank < job_threads ->                      /* if (rank < job_threads_): a later load */
#endif
        j = job_;                                  /* (*job_)(rank) */
        run_job(rank, j);
        d_step { assert(pending > 0); pending--; j = 0; k = 0; ph = 0; old = 0 }  /* pending_.fetch_sub */
     :: else
     fi
  od;
  workers--                                        /* the thread returns; join() can finish */
}

/* ThreadTeam::start_workers(size): `stopping_.store(false)`, `seen = post_.load()`, start ranks 1..size-1.
 * Atomic: a new worker can do nothing before the next post. */
inline start_workers(team_size) {
  atomic {
    stopping = false;
    r = 1;
    do
    :: r < team_size -> workers++; run worker(r, SEEN(post)); r++
    :: else -> r = 0; break
    od
  }
}

/* ThreadTeam::stop_workers(): `stopping_.store(true)`; `post(0)`; join every worker. */
inline stop_workers() {
  stopping = true;
  post = ((post >> 16) + 1) << 16;
  workers == 0
}

active proctype caller() {
  byte i, j, k, ph, old, r, size = TEAM;
  short n;
  d_step { PLAN };
  start_workers(TEAM);                             /* ThreadTeam(): set_size(default_thread_count()) */
  do
  :: i < NCALLS ->
     d_step { n = plan[i]; j = i + 1 };
     if
     :: n < 0 ->                                   /* set_size(-n), under lease_mutex_ */
        stop_workers();
        start_workers(-n);
        size = -n
     :: else ->                                    /* lease.run(n, job) */
        d_step { assert(1 <= n && n <= size); threads_of[j] = n; live = j };
        parties = n; arrived = 0;                  /* run: barrier_.reset(threads) */
        if
        :: n > 1 ->                                /* threads == 1: job(0) alone, nothing posted */
           job_ = j;                               /* run: job_ = &job */
#ifdef OLD_PROTOCOL
           job_threads = n;                        /* old run: job_threads_ = threads */
#endif
           pending = n - 1;                        /* run: pending_.store(threads - 1, relaxed) */
           post = ((post >> 16) + 1) << 16 | n     /* run: post(threads), release, then notify_all */
        :: else
        fi;
        run_job(0, j);                             /* run: job(0) */
        n == 1 || pending == 0;                    /* run: spin until pending_.load(acquire) == 0 */
        /* Every rank has finished: run() may return and the job be destroyed from here on. */
        d_step { assert(ran[j] == (1 << n) - 1); live = 0; k = 0; ph = 0; old = 0 };  /* (a) */
        job_ = 0                                   /* run: job_ = nullptr */
     fi;
     i++
  :: else -> break
  od;
  stop_workers();                                  /* ~ThreadTeam */
  finished = true
}

ltl terminates { <> finished }
