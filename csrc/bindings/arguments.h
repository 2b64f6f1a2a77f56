// Reading the arguments both extension modules take alike (_core, and _cuda / _cuda_emulated): names
// from a table, cells, the CUDA recurrence path, an LSTM's cell_clip, and shapes in messages.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "fusedrnn/cells.h"
#include "fusedrnn/cuda/persistent.h"
#include "fusedrnn/layer.h"

namespace fusedrnn::bindings {

// The Python name of each value of an enum, so that parsing, printing and the error message listing
// the choices come from one table.
template <typename E>
struct Named {
  const char* name;
  E value;
};

// "'a', 'b' or 'c'" for the names of `count` entries, name(i) giving the i-th.
template <typename NameOf>
std::string listed(std::size_t count, const NameOf& name) {
  std::string choices;
  for (std::size_t i = 0; i < count; ++i)
    choices += std::string(i == 0 ? "" : (i + 1 == count ? " or " : ", ")) + "'" + name(i) + "'";
  return choices;
}

template <typename E, std::size_t N>
E parse_named(const char* argument, const std::string& name, const Named<E> (&table)[N]) {
  for (const Named<E>& entry : table)
    if (name == entry.name) return entry.value;
  throw pybind11::value_error(std::string(argument) + ": expected " +
                              listed(N, [&](std::size_t i) { return table[i].name; }) + ", got '" + name + "'");
}

template <typename E, std::size_t N>
std::string name_of(E value, const Named<E> (&table)[N]) {
  for (const Named<E>& entry : table)
    if (value == entry.value) return entry.name;
  return "";
}

constexpr Named<gpu::RecurrencePath> kRecurrencePathNames[] = {{"auto", gpu::RecurrencePath::kAuto},
                                                               {"per_step", gpu::RecurrencePath::kPerStep},
                                                               {"persistent", gpu::RecurrencePath::kPersistent}};

inline CellKind parse_cell(const std::string& name) {
  for (const CellFacts& c : kCells)
    if (name == c.name) return c.kind;
  throw pybind11::value_error("cell: expected " +
                              listed(std::size(kCells), [](std::size_t i) { return kCells[i].name; }) +
                              ", got '" + name + "'");
}

// A positive finite bound, or None for no bound (the core's +inf), for a cell with a cell state: the
// rule and messages of the Python modules' check (_checks.cell_clip).
inline double checked_cell_clip(const pybind11::object& obj, CellKind cell) {
  if (obj.is_none()) return std::numeric_limits<double>::infinity();
  if (pybind11::isinstance<pybind11::bool_>(obj) ||
      (!pybind11::isinstance<pybind11::float_>(obj) && !pybind11::isinstance<pybind11::int_>(obj)))
    throw pybind11::type_error("cell_clip: expected a positive float or None, got " +
                               std::string(pybind11::str(pybind11::type::of(obj).attr("__name__"))));
  const double v = obj.cast<double>();
  if (!(v > 0.0 && v < std::numeric_limits<double>::infinity()))
    throw pybind11::value_error("cell_clip: expected a positive finite bound, got " + std::string(pybind11::str(obj)));
  if (!cell_facts(cell).has_cell_state)
    throw pybind11::value_error(std::string("cell_clip: '") + cell_facts(cell).name + "' has no cell state to clip");
  return v;
}

inline std::string shape_str(const std::vector<Index>& dims) {
  std::ostringstream s;
  s << '(';
  for (std::size_t i = 0; i < dims.size(); ++i) s << (i ? ", " : "") << dims[i];
  s << (dims.size() == 1 ? ",)" : ")");
  return s.str();
}

}  // namespace fusedrnn::bindings
