// OpenMP waits passively in our programs unless the user says otherwise (issue 12 §4): with the
// default policy, idle workers spin for a while after every parallel region, which made a training
// run 4.7-12x slower on a machine shared with one other busy process.
#pragma once

namespace lckv {

// Call first thing in main(). When OMP_WAIT_POLICY is unset it becomes PASSIVE. An OpenMP runtime
// (libgomp, libomp, libiomp5) reads the variable once, when it is loaded, which for a program
// linked with torch is before main: then the program re-executes itself (/proc/self/exe, same
// argv) so the runtime starts with the new value; the variable, now set, keeps that from repeating.
// A set OMP_WAIT_POLICY (ACTIVE, PASSIVE, even empty) is the user's choice and is left alone. If the
// re-exec fails the program carries on with the runtime's default.
void ensure_passive_openmp(int argc, char** argv);

}  // namespace lckv
