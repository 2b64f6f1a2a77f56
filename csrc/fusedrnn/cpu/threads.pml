/* ThreadTeam's job posting and SpinBarrier (threads.h, threads.cpp) as a Promela model for SPIN,
 * checked by .ci/check_team_model.sh. Built with -DOLD_PROTOCOL it is the protocol the post word
 * replaced (the generation in one atomic, job_threads_ and job_ read in later loads), which fails.
 *
 * Processes. `caller` is the thread holding the lease (rank 0): it makes the calls of PLAN in order,
 * jobs and resizes alike, then stops the team as a resize does. Callers on several threads take
 * turns on lease_mutex_, whose unlock/lock orders each call after the last, so one process stands for
 * them all. Each `worker` is one worker_loop thread (ranks 1..size-1); a resize joins them and starts
 * new ones. Each step's comment quotes the threads.cpp (or threads.h) statement it models.
 *
 * Properties, over every interleaving:
 *   (a) each rank < threads starts each job exactly once, no rank >= threads starts it, and all of
 *       them have started it when the caller sees pending_ == 0;
 *   (b) a rank reads job_ only while that job is live: not nullptr, and the caller has not yet seen
 *       pending_ == 0 (from then on run() may return and the job be destroyed); each rank's part
 *       also ends while the job is live, and pending_ never goes below 0;
 *   (c) no deadlock: the only end state is every process finished (SPIN's invalid end states), and
 *       `ltl terminates` (<> finished) holds, so no run stalls or goes on forever;
 *   (d) no rank leaves a job's k-th barrier wait before all the job's ranks have arrived there.
 *
 * Waits. A worker spins on post_, then sleeps on wake_ with the predicate post_ != seen; both are one
 * blocking step here, a load of post_ once it differs from seen. No wake-up is lost: post() changes
 * post_ holding sleep_mutex_, which the sleeper holds from its predicate test until wait() has queued
 * it, and notify_all follows the change. The spins on pending_ and on the other ranks' barrier counts
 * are blocking guards too.
 *
 * Memory order. Promela interleaves whole steps (sequential consistency); the C++ uses acquire/release.
 * The job handoff is message passing or a read-modify-write on one counter, never two threads each
 * storing one variable and loading the other's, the pattern where acquire/release allows outcomes no
 * interleaving has. job_, barrier_.reset() and pending_ are written before the release store of post_
 * that a worker's acquire load reads; a rank's reads of job_ and the barrier precede its acq_rel
 * fetch_sub of pending_, and the caller's acquire load that reads 0 synchronizes with every decrement
 * (a release sequence), so it writes job_ and resets the barrier only after them; stopping_ is stored
 * (seq_cst) before post(0), so a worker that loads the stop word reads it set. The barrier is that
 * pattern (each rank stores its own count, then loads the others'), but a rank leaves only once it has
 * read every other count at `reached` or more, and a count is written by its own rank alone and only
 * grows, so such a load proves that rank has arrived whatever order the stores became visible in; a
 * stale load only spins again. Reading the release store (or a later one of the same rank) makes that
 * rank's writes before its arrival visible after the wait. A worker's load of post_ may return an
 * older word than the latest, but only one naming a job the worker is not in (the caller posts
 * nothing while a rank of its job is still counted), or a stop; that is the same load made earlier,
 * while the word was the latest, with the worker then delayed.
 *
 * Scope. keep_workers_off_caller_cpu, FlushDenormals and the fork handlers change nothing the protocol
 * reads (a child's lost workers restart through start_workers, as in a resize). A job body is NB
 * barrier waits; the work between them touches no team state. A RankGroup's wait (some ranks of a
 * job meeting apart from the others, as a bidirectional layer's two halves do) is the same protocol
 * on the group's count lines alone; the model checks it on the whole job's.
 *
 * State space. The configuration below is small enough for exhaustive safety and liveness searches;
 * TEAM=5 with plan 2,5,3,1,4,-4,2,4,-5,5,3 passes them too, at a far larger cost (the sizes of both:
 * bench/NOTES.md, "Figures that were in code comments"). With -DOLD_PROTOCOL the depth-first search
 * fails assertion (a); in the shortest trail (pan -i), rank 2 takes generation 1 (a job of 2 ranks)
 * and is delayed until the job of 4 is set up, runs it, counts itself off, finds generation 2 new and
 * starts it again. TEAM=3 with plan 2,3 fails the same way.
 */

/* The configuration checked; -D overrides any of it, as in
 *   spin -a -DTEAM=3 -DNCALLS=2 '-DPLAN="plan[0] = 2; plan[1] = 3"' threads.pml */
#ifndef TEAM
#define TEAM   4   /* team size at the start: rank 0 and workers 1..3 */
#endif
#ifndef NB
#define NB     2   /* barrier waits per job */
#endif
#ifndef TEAM_MAX
#define TEAM_MAX 5 /* the most ranks any call of PLAN uses (barrier_.reserve) */
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
byte  parties;     /* the job's ranks: a wait's `count` (the whole job's group) */
byte  count[TEAM_MAX];  /* barrier_.arrivals_[rank].count */
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

/* SpinBarrier::wait(rank), the k-th call of job j (locals q, reached of the calling process). */
inline barrier_wait(rank, j, k) {
  if
  :: atomic { parties <= 1 -> came[j * NB + k]++ }     /* `if (count <= 1) return;` */
  :: else ->
     d_step {
       reached = count[rank] + 1;                       /* `reached = mine.load(relaxed) + 1` */
       count[rank] = reached;                           /* `mine.store(reached, release)` */
       came[j * NB + k]++
     };
     q = 0;
     do
     :: q < parties ->                                  /* spin until every other rank's */
        (q == rank || count[q] >= reached); q++         /* `count.load(acquire) >= reached` */
     :: else -> q = 0; break
     od
  fi;
  assert(came[j * NB + k] == threads_of[j])             /* (d) */
}

/* job(rank) for job j, the job read from job_ (locals k, q, reached). */
inline run_job(rank, j) {
  d_step {
    assert(j != 0 && j == live);                                    /* (b) */
    assert(rank < threads_of[j] && (ran[j] & (1 << rank)) == 0);    /* (a) */
    ran[j] = ran[j] | (1 << rank)
  }
  k = 0;
  do
  :: k < NB -> barrier_wait(rank, j, k); k++
  :: else -> break
  od;
  assert(j == live)                                                 /* (b) */
}

proctype worker(byte rank; int seen) {
  byte j, k, q, reached;
  do
  :: /* worker_loop: `word = post_.load(acquire)` until `word != seen` (spinning, then in
      * `wake_.wait` with that predicate); `seen = word` */
     atomic { SEEN(post) != seen -> seen = SEEN(post) };
     if
     :: stopping -> break                          /* `if (stopping_.load(acquire)) return;` */
     :: else
     fi;
#ifndef OLD_PROTOCOL
     if
     :: rank < (seen & 65535) ->                   /* `if (rank < post_threads(word))` */
#else
     if
     :: rank < job_threads ->                      /* old: `if (rank < job_threads_)`, a later load */
#endif
        j = job_;                                  /* `(*job_)(rank)` */
        run_job(rank, j);
        /* `pending_.fetch_sub(1, acq_rel)`; the locals are cleared so that idle states coincide */
        d_step { assert(pending > 0); pending--; j = 0; k = 0; reached = 0 }
     :: else
     fi
  od;
  workers--                                        /* the thread returns; its join() can finish */
}

/* ThreadTeam::start_workers(size): `stopping_.store(false)`; `seen = post_.load()`; start ranks
 * 1..size-1. Atomic: a new worker can do nothing before the next post. */
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
  byte i, j, k, q, reached, r, size = TEAM;
  short n;
  d_step { PLAN };
  start_workers(TEAM);                             /* ThreadTeam(): `set_size(default_thread_count())` */
  do
  :: i < NCALLS ->
     d_step { n = plan[i]; j = i + 1 };
     if
     :: n < 0 ->                                   /* `set_size(-n)`, under lease_mutex_ */
        assert(-n <= TEAM_MAX);                    /* `barrier_.reserve(threads)` */
        stop_workers();
        start_workers(-n);
        size = -n
     :: else ->                                    /* `lease.run(n, job)` */
        d_step { assert(1 <= n && n <= size); threads_of[j] = n; live = j };
        d_step {                                   /* run: `barrier_.reset(threads)` */
          parties = n; r = 0;
          do
          :: r < n -> count[r] = 0; r++
          :: else -> r = 0; break
          od
        };
        if
        :: n > 1 ->                                /* `if (threads == 1)`: job(0) alone, no post */
           job_ = j;                               /* run: `job_ = &job` */
#ifdef OLD_PROTOCOL
           job_threads = n;                        /* old run: `job_threads_ = threads` */
#endif
           pending = n - 1;                        /* run: `pending_.store(threads - 1, relaxed)` */
           post = ((post >> 16) + 1) << 16 | n     /* run: `post(threads)`: release store, notify_all */
        :: else
        fi;
        run_job(0, j);                             /* run: `job(0)` */
        n == 1 || pending == 0;                    /* run: until `pending_.load(acquire) == 0` */
        /* Every rank has finished: run() may return and the job be destroyed from here on. */
        d_step { assert(ran[j] == (1 << n) - 1); live = 0; k = 0; reached = 0 };   /* (a) */
        job_ = 0                                   /* run: `job_ = nullptr` */
     fi;
     i++
  :: else -> break
  od;
  stop_workers();                                  /* set_size: `stop_workers()` */
  finished = true
}

ltl terminates { <> finished }
