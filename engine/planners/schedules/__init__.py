"""Known pipeline schedules as data: per-rank lists of actions (like torch.distributed.pipelining).

* :mod:`.actions`: the data types (Action, Overlap, Schedule, PipelineShape);
* :mod:`.gpipe_1f1b`, :mod:`.zero_bubble`, :mod:`.dualpipe`: one module per family;
* :mod:`.timing`: a schedule -> its op-level semi-active :class:`~engine.core.ir.Plan`;
* :mod:`.fusion`: the step-level (runtime) view, with F&B overlap;
* :mod:`.library`: names, generators and the layout each schedule needs;
* :mod:`.torch_csv`: export as PyTorch pipelining CSV.
"""

from engine.planners.schedules.actions import Action, Overlap, PipelineShape, Schedule
from engine.planners.schedules.fusion import fuse, runtime_plan
from engine.planners.schedules.library import SCHEDULE_NAMES, SCHEDULES, applicable, generate, schedule_workload
from engine.planners.schedules.timing import ScheduleError, schedule_plan

__all__ = ["Action", "Overlap", "PipelineShape", "Schedule", "ScheduleError", "SCHEDULES", "SCHEDULE_NAMES",
           "applicable", "fuse", "generate", "runtime_plan", "schedule_plan", "schedule_workload"]
